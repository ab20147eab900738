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
    /// Written only when it differs from the defaults, so a node of the
    /// previous version (which refuses unknown keys) still reads the file.
    #[serde(default, skip_serializing_if = "IscsiConfig::is_default")]
    pub iscsi: IscsiConfig,
}

/// The iSCSI target's checks on silent initiators (RFC 7143 11.19.2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IscsiConfig {
    /// A connection whose initiator sent nothing for this long gets a
    /// NOP-In ping; 0 turns pings off.
    pub nop_interval_secs: u64,
    /// A pinged initiator still silent this long after the ping loses its
    /// connection (and, with it, what its nexus held).
    pub nop_timeout_secs: u64,
}

impl Default for IscsiConfig {
    fn default() -> Self {
        use cairn_iscsi::server::ServerConfig;
        Self {
            nop_interval_secs: ServerConfig::NOP_INTERVAL.as_secs(),
            nop_timeout_secs: ServerConfig::NOP_TIMEOUT.as_secs(),
        }
    }
}

impl IscsiConfig {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// Background work of the data service.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Re-replication after a failure is throttled to this rate.
    pub rebuild_bytes_per_sec: u64,
    /// How long, in seconds (0 to 86,400), extent groups that lost a
    /// replica because its node could not be reached run with a replica
    /// fewer, waiting for that node to come back and be caught up with only
    /// the writes it missed, before they are rebuilt whole on another node.
    /// 0 rebuilds at once. Written to the file only when set otherwise, as
    /// `deferred_sync_ms`.
    #[serde(skip_serializing_if = "is_default_rebuild_wait")]
    pub rebuild_wait_secs: u64,
    /// The scrubber re-reads and verifies replicas at this rate; 0 turns it off.
    pub scrub_bytes_per_sec: u64,
    /// The longest an acknowledged write whose host did not ask for
    /// durability (no FUA, no flush) stays in the page cache only, in
    /// milliseconds (10 to 600,000): what a power loss of every replica's
    /// node at once can take. Shorter syncs more often. Written to the file
    /// only when set otherwise, so that a version before it (which refuses
    /// unknown fields) can still read a config this one wrote.
    #[serde(skip_serializing_if = "is_default_deferred_sync")]
    pub deferred_sync_ms: u64,
}

fn is_default_rebuild_wait(secs: &u64) -> bool {
    *secs == cairn_data::repair::REBUILD_WAIT.as_secs()
}

/// What `[data] rebuild_wait_secs` may be.
const REBUILD_WAIT_SECS: std::ops::RangeInclusive<u64> = 0..=86_400;

fn is_default_deferred_sync(ms: &u64) -> bool {
    u128::from(*ms) == cairn_data::maintenance::SYNC_INTERVAL.as_millis()
}

/// What `[data] deferred_sync_ms` may be.
const DEFERRED_SYNC_MS: std::ops::RangeInclusive<u64> = 10..=600_000;

impl DataConfig {
    /// [`Self::rebuild_wait_secs`] as a duration, held to its bounds.
    pub fn rebuild_wait(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.rebuild_wait_secs.min(*REBUILD_WAIT_SECS.end()))
    }

    /// [`Self::deferred_sync_ms`] as a duration (`load` refuses values out
    /// of bounds; a config built in code is held to them here).
    pub fn deferred_sync(&self) -> std::time::Duration {
        std::time::Duration::from_millis(
            self.deferred_sync_ms
                .clamp(*DEFERRED_SYNC_MS.start(), *DEFERRED_SYNC_MS.end()),
        )
    }
}

impl Default for DataConfig {
    fn default() -> Self {
        let d = cairn_data::repair::MonitorConfig::default();
        Self {
            rebuild_bytes_per_sec: d.rebuild_bytes_per_sec,
            rebuild_wait_secs: d.rebuild_wait.as_secs(),
            scrub_bytes_per_sec: d.scrub_bytes_per_sec,
            deferred_sync_ms: cairn_data::maintenance::SYNC_INTERVAL.as_millis() as u64,
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
        if !DEFERRED_SYNC_MS.contains(&cfg.data.deferred_sync_ms) {
            bail!(
                "invalid config {}: data.deferred_sync_ms must be from {} to {} (milliseconds)",
                path.display(),
                DEFERRED_SYNC_MS.start(),
                DEFERRED_SYNC_MS.end()
            );
        }
        if !REBUILD_WAIT_SECS.contains(&cfg.data.rebuild_wait_secs) {
            bail!(
                "invalid config {}: data.rebuild_wait_secs must be from {} to {} (seconds)",
                path.display(),
                REBUILD_WAIT_SECS.start(),
                REBUILD_WAIT_SECS.end()
            );
        }
        if cfg.iscsi.nop_interval_secs > 0 && cfg.iscsi.nop_timeout_secs == 0 {
            bail!(
                "invalid config {}: iscsi.nop_timeout_secs must be positive while pings are on \
                 (nop_interval_secs = 0 turns them off)",
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

    /// The keys every config must have, and nothing else.
    const MINIMAL: &str = "node_id = 2\ncluster_id = \"c\"\nrpc_addr = \"127.0.0.2:7100\"\n\
                           api_addr = \"127.0.0.2:8443\"\nadmin_token_sha256 = \"00\"\n";

    /// A config written before iSCSI existed still loads, with the portal
    /// on the RPC IP and the standard port.
    #[test]
    fn old_config_gets_the_default_iscsi_portal() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!("cairn-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(CONFIG_FILE);
        std::fs::write(&path, MINIMAL)?;
        let cfg = NodeConfig::load(&path);
        let _ = std::fs::remove_dir_all(&dir);
        let cfg = cfg?;
        assert_eq!(cfg.iscsi_addr(), "127.0.0.2:3260".parse()?);
        assert_eq!(cfg.iscsi_addr, Some("127.0.0.2:3260".parse()?));
        assert_eq!(cfg.iscsi, IscsiConfig::default());
        assert_eq!(cfg.iscsi.nop_interval_secs, 15);
        Ok(())
    }

    /// `[iscsi]` sets the ping interval and timeout; pings on with a zero
    /// timeout is refused; a config at the defaults is saved without the
    /// section, so the previous version can still read it.
    #[test]
    fn iscsi_pings_are_configurable() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!("cairn-config-iscsi-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(CONFIG_FILE);
        let base = MINIMAL;
        std::fs::write(
            &path,
            format!("{base}[iscsi]\nnop_interval_secs = 5\nnop_timeout_secs = 7\n"),
        )?;
        let cfg = NodeConfig::load(&path)?;
        assert_eq!(
            (cfg.iscsi.nop_interval_secs, cfg.iscsi.nop_timeout_secs),
            (5, 7)
        );
        assert!(toml::to_string_pretty(&cfg)?.contains("[iscsi]"));

        std::fs::write(&path, format!("{base}[iscsi]\nnop_interval_secs = 0\n"))?;
        let cfg = NodeConfig::load(&path)?;
        assert_eq!(
            (cfg.iscsi.nop_interval_secs, cfg.iscsi.nop_timeout_secs),
            (0, 30)
        );

        std::fs::write(&path, format!("{base}[iscsi]\nnop_timeout_secs = 0\n"))?;
        let err = format!("{:#}", NodeConfig::load(&path).err().context("accepted")?);
        assert!(err.contains("nop_timeout_secs"), "{err}");

        std::fs::write(&path, format!("{base}[iscsi]\nnop_intervall_secs = 3\n"))?;
        assert!(
            NodeConfig::load(&path).is_err(),
            "a misspelt key was accepted"
        );

        std::fs::write(&path, base)?;
        let cfg = NodeConfig::load(&path)?;
        assert!(!toml::to_string_pretty(&cfg)?.contains("iscsi]"));
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    /// `[data] deferred_sync_ms` sets the syncer's period within its
    /// bounds, and is saved only when set, so the previous version (which
    /// refuses unknown keys) can still read a config at the defaults.
    #[test]
    fn the_deferred_sync_period_is_configurable() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!("cairn-config-sync-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(CONFIG_FILE);
        let base = MINIMAL;
        std::fs::write(&path, base)?;
        let cfg = NodeConfig::load(&path)?;
        assert_eq!(cfg.data.deferred_sync(), std::time::Duration::from_secs(1));
        assert!(!toml::to_string_pretty(&cfg)?.contains("deferred_sync_ms"));

        std::fs::write(&path, format!("{base}[data]\ndeferred_sync_ms = 250\n"))?;
        let cfg = NodeConfig::load(&path)?;
        assert_eq!(
            cfg.data.deferred_sync(),
            std::time::Duration::from_millis(250)
        );
        assert!(toml::to_string_pretty(&cfg)?.contains("deferred_sync_ms = 250"));

        for bad in [0, 9, 600_001] {
            std::fs::write(&path, format!("{base}[data]\ndeferred_sync_ms = {bad}\n"))?;
            let err = format!("{:#}", NodeConfig::load(&path).err().context("accepted")?);
            assert!(err.contains("deferred_sync_ms"), "{err}");
        }
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
