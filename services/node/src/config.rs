//! The node configuration file (`<data>/cairn.toml`) and the data folder layout.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

pub const CONFIG_FILE: &str = "cairn.toml";
pub const TOKEN_FILE: &str = "admin.token";

/// One node's configuration. Unknown keys are an error, so typos are caught.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub node_id: u64,
    pub cluster_id: String,
    /// Folder holding this node's state (defaults to the config file's folder).
    #[serde(default)]
    pub data_dir: PathBuf,
    pub rpc_addr: SocketAddr,
    pub api_addr: SocketAddr,
    /// The iSCSI portal. Absent from config files written before iSCSI
    /// existed: [`NodeConfig::load`] fills in [`default_iscsi_addr`], so
    /// after loading it is always set (use [`NodeConfig::iscsi_addr`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iscsi_addr: Option<SocketAddr>,
    /// Hex SHA-256 of the admin bearer token.
    pub admin_token_sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join: Option<JoinConfig>,
    #[serde(default)]
    pub raft: RaftConfig,
    /// Local disks for extent groups: mounted block devices' folders, or
    /// plain folders for tests and the demo. Empty means one disk at
    /// `<data_dir>/disks/d0`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskConfig>,
    #[serde(default)]
    pub data: DataConfig,
}

/// Background work of the data service.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Re-replication after a failure is throttled to this rate.
    pub rebuild_bytes_per_sec: u64,
    /// The scrubber re-reads and verifies replicas at this rate; 0 turns it off.
    pub scrub_bytes_per_sec: u64,
}

impl Default for DataConfig {
    fn default() -> Self {
        let d = cairn_data::repair::MonitorConfig::default();
        Self {
            rebuild_bytes_per_sec: d.rebuild_bytes_per_sec,
            scrub_bytes_per_sec: d.scrub_bytes_per_sec,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub path: PathBuf,
    /// Bytes this disk may hold; 0 or absent means its file system's size.
    #[serde(default)]
    pub capacity_bytes: u64,
}

/// Present on nodes created by `cairn cluster join` until they are members.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinConfig {
    /// REST address of the node that admitted us.
    pub seed_api: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftConfig {
    pub tick_ms: u64,
    pub election_tick: usize,
    pub heartbeat_tick: usize,
    pub compact_threshold: u64,
    pub compact_retain: u64,
    pub request_timeout_ms: u64,
}

impl Default for RaftConfig {
    fn default() -> Self {
        let d = cairn_metadata::node::RaftSettings::default();
        Self {
            tick_ms: u64::try_from(d.tick.as_millis()).unwrap_or(100),
            election_tick: d.election_tick,
            heartbeat_tick: d.heartbeat_tick,
            compact_threshold: d.compact_threshold,
            compact_retain: d.compact_retain,
            request_timeout_ms: 5_000,
        }
    }
}

/// The standard iSCSI port (RFC 7143 13.2), on the RPC address's IP.
pub const ISCSI_PORT: u16 = 3260;

/// A node's iSCSI portal when none is configured: its RPC IP, port 3260.
pub fn default_iscsi_addr(rpc_addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(rpc_addr.ip(), ISCSI_PORT)
}

impl NodeConfig {
    /// Where this node serves iSCSI.
    pub fn iscsi_addr(&self) -> SocketAddr {
        self.iscsi_addr
            .unwrap_or_else(|| default_iscsi_addr(self.rpc_addr))
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        let mut cfg: NodeConfig =
            toml::from_str(&text).with_context(|| format!("invalid config {}", path.display()))?;
        if cfg.data_dir.as_os_str().is_empty() {
            cfg.data_dir = path
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("."));
        }
        cfg.iscsi_addr = Some(cfg.iscsi_addr());
        if cfg.node_id == 0 {
            bail!(
                "invalid config {}: node_id must be positive",
                path.display()
            );
        }
        if cfg.raft.tick_ms == 0
            || cfg.raft.heartbeat_tick == 0
            || cfg.raft.election_tick <= cfg.raft.heartbeat_tick
        {
            bail!(
                "invalid config {}: need tick_ms > 0 and election_tick > heartbeat_tick > 0",
                path.display()
            );
        }
        Ok(cfg)
    }

    pub fn save(&self) -> anyhow::Result<()> {
        let text = toml::to_string_pretty(self)?;
        let path = self.data_dir.join(CONFIG_FILE);
        cairn_util::durable::write_file_durable(&path, text.as_bytes(), 0o644)
            .with_context(|| format!("cannot write {}", path.display()))
    }

    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("metadata")
    }

    /// The data disks, with the default when none are configured.
    pub fn data_disks(&self) -> Vec<(PathBuf, u64)> {
        if self.disks.is_empty() {
            return vec![(self.data_dir.join("disks").join("d0"), 0)];
        }
        self.disks
            .iter()
            .map(|d| {
                let p = if d.path.is_relative() {
                    self.data_dir.join(&d.path)
                } else {
                    d.path.clone()
                };
                (p, d.capacity_bytes)
            })
            .collect()
    }
}

/// Reads the admin token stored in a data folder.
pub fn read_token(data_dir: &Path) -> anyhow::Result<String> {
    let p = data_dir.join(TOKEN_FILE);
    Ok(std::fs::read_to_string(&p)
        .with_context(|| format!("cannot read token file {}", p.display()))?
        .trim()
        .to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config written before iSCSI existed still loads, with the portal
    /// on the RPC IP and the standard port.
    #[test]
    fn old_config_gets_the_default_iscsi_portal() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!("cairn-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(CONFIG_FILE);
        std::fs::write(
            &path,
            "node_id = 2\ncluster_id = \"c\"\nrpc_addr = \"127.0.0.2:7100\"\n\
             api_addr = \"127.0.0.2:8443\"\nadmin_token_sha256 = \"00\"\n",
        )?;
        let cfg = NodeConfig::load(&path);
        let _ = std::fs::remove_dir_all(&dir);
        let cfg = cfg?;
        assert_eq!(cfg.iscsi_addr(), "127.0.0.2:3260".parse()?);
        assert_eq!(cfg.iscsi_addr, Some("127.0.0.2:3260".parse()?));
        Ok(())
    }
}
