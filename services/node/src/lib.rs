//! `cairn`: the node binary and command line. It composes the services
//! (metadata, management, and later data, iSCSI, NFS) into one process with
//! `cairn node run`, and drives a cluster's REST API for everything else.

mod client;
mod config;
mod demo;
mod iscsi;
mod run;
mod setup;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};

use crate::client::Api;
use crate::config::{read_token, NodeConfig, CONFIG_FILE};

#[derive(Parser)]
#[command(
    name = "cairn",
    version,
    about = "Cairn hyper-converged storage: node and command line"
)]
struct Cli {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args)]
struct Conn {
    /// REST endpoint of any node (host:port).
    #[arg(long, global = true, env = "CAIRN_ENDPOINT")]
    endpoint: Option<String>,
    /// Admin bearer token.
    #[arg(long, global = true, env = "CAIRN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Cluster CA certificate (PEM) to verify the API's TLS certificate.
    #[arg(long, global = true, env = "CAIRN_CA")]
    ca: Option<PathBuf>,
    /// A node's data folder: its endpoint, token and CA are used by default.
    #[arg(long = "data-dir", global = true, env = "CAIRN_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Output format: table or json (for `extent export`: the image file).
    #[arg(short = 'o', long, global = true)]
    output: Option<String>,
}

impl Conn {
    fn format(&self) -> anyhow::Result<Output> {
        match self.output.as_deref() {
            None | Some("table") => Ok(Output::Table),
            Some("json") => Ok(Output::Json),
            Some(other) => bail!("unknown output format {other:?}: use table or json"),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run or list nodes.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Create, join and inspect the cluster.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Manage datastores (namespaces with replication and compression policies).
    #[command(subcommand)]
    Datastore(DatastoreCmd),
    /// Manage vdisks (thin virtual block devices).
    #[command(subcommand)]
    Vdisk(VdiskCmd),
    /// Follow long operations (rebuilds, ...).
    #[command(subcommand)]
    Task(TaskCmd),
    /// Export vdisks over iSCSI: targets, LUNs, CHAP, initiator allow lists.
    #[command(subcommand)]
    Iscsi(IscsiCmd),
    /// Offline tools on extent group files (no cluster needed).
    #[command(subcommand)]
    Extent(ExtentCmd),
    /// Start a local 3-node demo cluster on 127.0.0.1-3 (Ctrl-C stops it).
    Demo {
        /// Folder holding the demo nodes' data and logs.
        #[arg(long, default_value = "cairn-demo")]
        root: PathBuf,
        #[arg(long, default_value_t = 3)]
        nodes: usize,
    },
}

#[derive(Subcommand)]
enum NodeCmd {
    /// Run a node from its config file (foreground).
    Run {
        #[arg(long)]
        config: PathBuf,
    },
    /// List the cluster's nodes.
    List,
    /// Announce that a node will be away (an upgrade, a reboot): until the
    /// mark ends, groups that lose a replica on it wait for it to come back
    /// instead of being rebuilt on another node.
    #[command(subcommand)]
    Maintenance(MaintenanceCmd),
}

#[derive(Subcommand)]
enum MaintenanceCmd {
    /// Start (or replace) a node's maintenance mark.
    Start {
        /// The node's id (`cairn node list`).
        id: u64,
        /// How long the node may stay away: seconds, or with a unit
        /// (90s, 20m, 2h, 1d); at most 7 days.
        #[arg(long = "for", value_parser = parse_duration_secs)]
        duration: u64,
        /// Shown with the mark ("kernel upgrade").
        #[arg(long, default_value = "")]
        reason: String,
        /// Wait for the drain (the node's vdisks moving to other nodes),
        /// with a progress bar, before returning.
        #[arg(long)]
        wait: bool,
    },
    /// End a node's maintenance mark.
    End {
        /// The node's id.
        id: u64,
    },
}

/// `90`, `90s`, `20m`, `2h`, `1d` → seconds.
fn parse_duration_secs(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 90s, 20m, 2h or 1d"))?;
    let mul = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("unknown unit {unit:?} in {s:?}: use s, m, h or d")),
    };
    n.checked_mul(mul)
        .ok_or_else(|| format!("{s:?} is too long"))
}

/// For the table: a node's maintenance mark as one cell ("ends in 19m 40s
/// (reason)"); JSON output keeps the object.
fn maintenance_cells(v: &mut Value, now_ms: u64) {
    let rows: Vec<&mut Value> = match v {
        Value::Array(a) => a.iter_mut().collect(),
        other => vec![other],
    };
    for r in rows {
        let Some(m) = r.get("maintenance").filter(|m| m.is_object()) else {
            continue;
        };
        let left = m["until_unix_ms"]
            .as_u64()
            .unwrap_or(0)
            .saturating_sub(now_ms)
            / 1000;
        let reason = m["reason"].as_str().unwrap_or_default();
        let mut cell = format!("ends in {}m {:02}s", left / 60, left % 60);
        if !reason.is_empty() {
            cell.push_str(&format!(" ({reason})"));
        }
        r["maintenance"] = Value::String(cell);
    }
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Create a new cluster whose first node lives in --data-dir.
    Init {
        #[arg(long, default_value = "cairn")]
        name: String,
        #[arg(long, default_value = "127.0.0.1:7100")]
        rpc_addr: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:8443")]
        api_addr: SocketAddr,
        /// iSCSI portal (default: the RPC address's IP, port 3260).
        #[arg(long)]
        iscsi_addr: Option<SocketAddr>,
    },
    /// Prepare --data-dir as a new node of an existing cluster (needs --seed, --ca, --token).
    Join {
        /// REST endpoint of a member node.
        #[arg(long)]
        seed: String,
        #[arg(long)]
        rpc_addr: SocketAddr,
        #[arg(long)]
        api_addr: SocketAddr,
        /// iSCSI portal (default: the RPC address's IP, port 3260).
        #[arg(long)]
        iscsi_addr: Option<SocketAddr>,
    },
    /// Show the cluster, its leader and its members.
    Status,
    /// Remove a node from the cluster's metadata group.
    RemoveNode { id: u64 },
}

#[derive(Subcommand)]
enum DatastoreCmd {
    Create {
        name: String,
        /// Replication factor: 1, 2 or 3.
        #[arg(long, default_value_t = 2)]
        rf: u32,
        #[arg(long)]
        compression: bool,
    },
    List,
    Get {
        name: String,
    },
    Delete {
        name: String,
    },
}

#[derive(Subcommand)]
enum VdiskCmd {
    Create {
        #[arg(long)]
        datastore: String,
        name: String,
        /// Size, e.g. 10G, 512M, 1T or bytes.
        #[arg(long)]
        size: String,
        /// Owner node (default: the node that serves the request).
        #[arg(long)]
        owner: Option<u64>,
    },
    List {
        #[arg(long)]
        datastore: String,
    },
    Get {
        #[arg(long)]
        datastore: String,
        name: String,
    },
    Delete {
        #[arg(long)]
        datastore: String,
        name: String,
    },
    Resize {
        #[arg(long)]
        datastore: String,
        name: String,
        #[arg(long)]
        size: String,
    },
    /// Take an instant, copy-on-write snapshot.
    Snapshot {
        #[arg(long)]
        datastore: String,
        name: String,
        #[arg(long)]
        snapshot: String,
    },
    /// List a vdisk's snapshots.
    Snapshots {
        #[arg(long)]
        datastore: String,
        name: String,
    },
    /// Delete a snapshot (frees what nothing else references).
    DeleteSnapshot {
        #[arg(long)]
        datastore: String,
        name: String,
        #[arg(long)]
        snapshot: String,
    },
    /// Make a writable vdisk from a snapshot.
    Clone {
        #[arg(long)]
        datastore: String,
        name: String,
        #[arg(long)]
        snapshot: String,
        /// Name of the new vdisk.
        #[arg(long = "to")]
        clone: String,
    },
}

#[derive(Subcommand)]
enum IscsiCmd {
    /// iSCSI targets: every node exports each of them.
    #[command(subcommand)]
    Target(TargetCmd),
}

#[derive(Subcommand)]
enum TargetCmd {
    /// Create a target. Secrets are read from files or the environment
    /// rather than typed on the command line, where `ps` shows them.
    Create {
        /// iqn.YYYY-MM.reversed.domain[:name] or eui.<16 hex digits>.
        iqn: String,
        /// LUN=VDISK (vdisk id, datastore/name, or a unique name); repeatable.
        #[arg(long = "lun", value_name = "LUN=VDISK")]
        luns: Vec<String>,
        /// CHAP user the initiators must log in as (one-way CHAP).
        #[arg(long, requires = "chap_secret_source")]
        chap_user: Option<String>,
        /// CHAP secret (12-16 characters); prefer --chap-secret-file.
        #[arg(
            long,
            env = "CAIRN_CHAP_SECRET",
            hide_env_values = true,
            group = "chap_secret_source",
            conflicts_with = "chap_secret_file"
        )]
        chap_secret: Option<String>,
        /// File holding the CHAP secret (one line; the newline is dropped).
        #[arg(long, group = "chap_secret_source")]
        chap_secret_file: Option<PathBuf>,
        /// Mutual CHAP: the user the target proves itself as (needs --chap-user).
        #[arg(long, requires = "mutual_secret_source")]
        mutual_user: Option<String>,
        /// Mutual CHAP secret (12-16 characters, not the one-way secret).
        #[arg(
            long,
            env = "CAIRN_MUTUAL_SECRET",
            hide_env_values = true,
            group = "mutual_secret_source",
            conflicts_with = "mutual_secret_file"
        )]
        mutual_secret: Option<String>,
        /// File holding the mutual CHAP secret.
        #[arg(long, group = "mutual_secret_source")]
        mutual_secret_file: Option<PathBuf>,
        /// Initiator name allowed to log in; repeatable (default: any).
        #[arg(long = "allow", value_name = "INITIATOR_IQN")]
        allow: Vec<String>,
    },
    /// List targets (secrets are never shown; CHAP yes/no and the user are).
    List,
    /// Show one target.
    Get { iqn: String },
    /// Delete a target (its vdisks stay).
    Delete { iqn: String },
    /// Add a LUN to a target.
    Map {
        iqn: String,
        #[arg(long = "lun", value_name = "LUN=VDISK")]
        lun: String,
    },
    /// Remove a LUN from a target (the vdisk stays).
    Unmap {
        iqn: String,
        #[arg(long)]
        lun: u64,
    },
}

#[derive(Subcommand)]
enum TaskCmd {
    /// List tasks, newest last.
    List,
    /// Show a task's progress as a bar until it ends (latest task if no id).
    Watch { id: Option<String> },
}

#[derive(Subcommand)]
enum ExtentCmd {
    /// Print an extent group file's header and checksum state.
    Inspect { file: PathBuf },
    /// Verify every block of every extent group file under the folders.
    Verify {
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
    },
    /// Rebuild a vdisk image from extent group files alone.
    Export {
        #[arg(long)]
        vdisk: String,
        /// Folders to search (e.g. every node's disks).
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
        /// The view as of this generation (a snapshot's) instead of the latest.
        #[arg(long)]
        generation: Option<u64>,
        /// Image size (default: the vdisk size recorded in the files).
        #[arg(long)]
        size: Option<String>,
    },
}

/// Parses 10G / 512M / 1T / 4096 (binary units).
fn parse_size(s: &str) -> anyhow::Result<u64> {
    let t = s.trim().trim_end_matches("iB").trim_end_matches('B');
    let (num, shift) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 30),
        Some('T' | 't') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: u64 = num
        .trim()
        .parse()
        .with_context(|| format!("invalid size {s:?}: use e.g. 10G, 512M or a byte count"))?;
    n.checked_mul(1u64 << shift)
        .with_context(|| format!("size {s:?} is too large"))
}

impl Conn {
    fn api(&self, timeout: Duration) -> anyhow::Result<Api> {
        let cfg = match &self.data_dir {
            Some(d) => Some(NodeConfig::load(&d.join(CONFIG_FILE))?),
            None => None,
        };
        let endpoint = match (&self.endpoint, &cfg) {
            (Some(e), _) => e.clone(),
            (None, Some(c)) => c.api_addr.to_string(),
            (None, None) => {
                bail!("no cluster endpoint: pass --endpoint or --data-dir, or set CAIRN_ENDPOINT")
            }
        };
        let token = match (&self.token, &self.data_dir) {
            (Some(t), _) => t.clone(),
            (None, Some(d)) => read_token(d)?,
            (None, None) => bail!("no token: pass --token or --data-dir, or set CAIRN_TOKEN"),
        };
        let ca_path = match (&self.ca, &self.data_dir) {
            (Some(c), _) => c.clone(),
            (None, Some(d)) => d.join("tls/ca.pem"),
            (None, None) => bail!("no CA certificate: pass --ca or --data-dir, or set CAIRN_CA"),
        };
        let ca = std::fs::read_to_string(&ca_path)
            .with_context(|| format!("cannot read CA {}", ca_path.display()))?;
        Api::new(&endpoint, &ca, token, timeout)
    }
}

fn print(out: Output, v: &Value, columns: &[&str]) {
    if out == Output::Json {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
        return;
    }
    let rows: Vec<&Value> = match v {
        Value::Array(a) => a.iter().collect(),
        Value::Null => return,
        other => vec![other],
    };
    let cell = |r: &Value, c: &str| match &r[c] {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    };
    let widths: Vec<usize> = columns
        .iter()
        .map(|c| {
            rows.iter()
                .map(|r| cell(r, c).len())
                .max()
                .unwrap_or(0)
                .max(c.len())
        })
        .collect();
    let line = |vals: Vec<String>| {
        vals.iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    println!(
        "{}",
        line(columns.iter().map(|c| c.to_uppercase()).collect())
    );
    for r in rows {
        println!("{}", line(columns.iter().map(|c| cell(r, c)).collect()));
    }
}

const DS_COLS: &[&str] = &["name", "replication_factor", "compression", "id"];
const VD_COLS: &[&str] = &["name", "datastore", "size_bytes", "owner_node_id", "id"];
const SNAP_COLS: &[&str] = &["name", "generation", "vdisk_id", "id"];
const TASK_COLS: &[&str] = &[
    "id",
    "kind",
    "state",
    "percent",
    "done_bytes",
    "total_bytes",
    "message",
];

fn vd_path(ds: &str, name: &str) -> String {
    format!("/v1/datastores/{}/vdisks/{}", seg(ds), seg(name))
}

/// Waits for a drain task to appear (the metadata leader's next monitor
/// pass writes it), then watches it; prints what stays on the node.
fn wait_drain(api: &client::Api, task: &str, out: Output) -> anyhow::Result<()> {
    let path = format!("/v1/tasks/{}", seg(task));
    let t0 = std::time::Instant::now();
    loop {
        match api.get(&path) {
            Ok(_) => break,
            Err(client::ApiError::Problem { status: 404, .. })
                if t0.elapsed() < Duration::from_secs(60) =>
            {
                std::thread::sleep(Duration::from_millis(500))
            }
            Err(e) => bail!("the drain task {task}: {e}"),
        }
    }
    watch_task(api, Some(task.to_string()), out)?;
    let t = api.get(&path)?;
    if let Some(msg) = t["message"].as_str().filter(|m| !m.is_empty()) {
        if out != Output::Json {
            println!("{msg}");
        }
    }
    Ok(())
}

/// Polls a task and draws a progress bar until it ends.
fn watch_task(api: &client::Api, id: Option<String>, out: Output) -> anyhow::Result<()> {
    use std::io::Write as _;
    let id = match id {
        Some(i) => i,
        None => api
            .get("/v1/tasks")?
            .as_array()
            .and_then(|a| a.last())
            .and_then(|t| t["id"].as_str())
            .map(str::to_string)
            .ok_or_else(|| anyhow::anyhow!("there are no tasks"))?,
    };
    loop {
        let t = api.get(&format!("/v1/tasks/{}", seg(&id)))?;
        let pct = t["percent"].as_f64().unwrap_or(0.0);
        let state = t["state"].as_str().unwrap_or("unknown").to_string();
        if out == Output::Json {
            println!("{t}");
        } else {
            let width = 40usize;
            let filled = ((pct / 100.0) * width as f64).round() as usize;
            let eta = t["eta_secs"]
                .as_u64()
                .map(|s| format!(" ETA {s}s"))
                .unwrap_or_default();
            print!(
                "\r{} [{}{}] {:5.1}% {}/{} MiB {}{}   ",
                t["kind"].as_str().unwrap_or(""),
                "#".repeat(filled.min(width)),
                "-".repeat(width - filled.min(width)),
                pct,
                t["done_bytes"].as_u64().unwrap_or(0) >> 20,
                t["total_bytes"].as_u64().unwrap_or(0) >> 20,
                state,
                eta
            );
            let _ = std::io::stdout().flush();
        }
        if state != "running" {
            if out == Output::Table {
                println!();
            }
            if state == "failed" {
                bail!("task {id} failed: {}", t["message"].as_str().unwrap_or(""));
            }
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
const NODE_COLS: &[&str] = &[
    "id",
    "role",
    "rpc_addr",
    "api_addr",
    "iscsi_addr",
    "version",
    "maintenance",
];
const TARGET_COLS: &[&str] = &["iqn", "luns", "chap", "chap_user", "mutual_chap", "allowed"];

/// `0=VDISK` → the JSON of one LUN.
fn parse_lun(s: &str) -> anyhow::Result<Value> {
    let (lun, vdisk) = s
        .split_once('=')
        .with_context(|| format!("invalid --lun {s:?}: use LUN=VDISK, e.g. 0=vm1"))?;
    let lun: u64 = lun
        .trim()
        .parse()
        .with_context(|| format!("invalid --lun {s:?}: the LUN must be a number"))?;
    if vdisk.trim().is_empty() {
        bail!("invalid --lun {s:?}: name the vdisk after '='");
    }
    Ok(json!({ "lun": lun, "vdisk": vdisk.trim() }))
}

/// A secret from the command line/environment or from a file. The error
/// names the file, never its content.
fn read_secret(value: Option<String>, file: Option<PathBuf>) -> anyhow::Result<String> {
    match (value, file) {
        (Some(v), _) => Ok(v),
        (None, Some(f)) => {
            let text = std::fs::read_to_string(&f)
                .with_context(|| format!("cannot read secret file {}", f.display()))?;
            Ok(text.trim_end_matches(['\n', '\r']).to_string())
        }
        (None, None) => Ok(String::new()),
    }
}

/// Targets as table rows: LUNs as `0=ds/vdisk`, allow list joined.
fn target_rows(v: &Value) -> Value {
    let row = |t: &Value| {
        let luns: Vec<String> = t["luns"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|l| {
                        format!(
                            "{}={}/{}",
                            l["lun"],
                            l["datastore"].as_str().unwrap_or(""),
                            l["vdisk"].as_str().unwrap_or("")
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let allowed: Vec<&str> = t["allowed_initiators"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        json!({
            "iqn": t["iqn"],
            "luns": luns.join(","),
            "chap": t["chap"],
            "chap_user": t["chap_user"],
            "mutual_chap": t["mutual_chap"],
            "allowed": if allowed.is_empty() { "any".to_string() } else { allowed.join(",") },
        })
    };
    match v {
        Value::Array(a) => Value::Array(a.iter().map(row).collect()),
        other => row(other),
    }
}

fn print_targets(out: Output, v: &Value) {
    if out == Output::Json {
        print(out, v, TARGET_COLS);
    } else {
        print(out, &target_rows(v), TARGET_COLS);
    }
}

fn target_path(iqn: &str) -> String {
    format!("/v1/iscsi/targets/{}", seg(iqn))
}

fn seg(s: &str) -> String {
    // Names are validated server-side to [A-Za-z0-9._-]; percent-encode anything else.
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"._-".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Tells glibc's allocator to keep freed buffers for reuse. A node
/// allocates and frees a buffer per large I/O (an iSCSI command's data of
/// up to a 1 MiB burst, a replica frame carrying one vblock's piece). By
/// default glibc maps those above a threshold it raises as it goes, and
/// gives freed memory back to the kernel, so buffers kept arriving as new
/// pages: a page fault per 4 KiB.
/// Under a hypervisor that reclaims freed guest memory each fault is dear:
/// on the test VM they were ~8 % of a replica's CPU on 1 MiB writes. Up to
/// 256 MiB of free heap stays with the process instead.
fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // Far above the data path's buffers; only a rare frame near the
        // replica fast path's 65 MiB limit is still mapped.
        const MMAP_FROM: libc::c_int = 64 << 20;
        const TRIM_FROM: libc::c_int = 256 << 20;
        #[allow(unsafe_code)]
        // SAFETY: mallopt(3) only sets allocator parameters; it is called
        // before the runtime starts any thread.
        let ok = unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_FROM) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_FROM) == 1
        };
        if !ok {
            tracing::warn!("mallopt refused; freed I/O buffers go back to the kernel");
        }
    }
}

/// A one-shot command piped into `head` ends quietly, as other Unix tools
/// do, instead of panicking on its next print ("Broken pipe"): the Rust
/// runtime ignores SIGPIPE, which only the servers (`node run`, `demo`)
/// need, for their sockets.
fn end_quietly_on_closed_pipe() {
    #[cfg(unix)]
    {
        #[allow(unsafe_code)]
        // SAFETY: signal(2) with SIG_DFL installs no handler code; it runs
        // before this one-shot command starts any thread.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
}

fn real_main(cli: Cli) -> anyhow::Result<()> {
    if !matches!(cli.cmd, Cmd::Node(NodeCmd::Run { .. }) | Cmd::Demo { .. }) {
        end_quietly_on_closed_pipe();
    }
    let image = cli.conn.output.clone();
    let out = match &cli.cmd {
        Cmd::Extent(ExtentCmd::Export { .. }) => Output::Table,
        _ => cli.conn.format()?,
    };
    let api = || cli.conn.api(Duration::from_secs(30));
    match cli.cmd {
        Cmd::Node(NodeCmd::Run { config }) => {
            init_tracing();
            keep_freed_buffers();
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("cairn")
                .build()?;
            rt.block_on(run::run(&config))?;
        }
        Cmd::Node(NodeCmd::List) => {
            let mut v = api()?.get("/v1/nodes")?;
            if out != Output::Json {
                maintenance_cells(&mut v, cairn_util::now_unix_ms());
            }
            print(out, &v, NODE_COLS)
        }
        Cmd::Node(NodeCmd::Maintenance(MaintenanceCmd::Start {
            id,
            duration,
            reason,
            wait,
        })) => {
            let api = api()?;
            let mut v = api.put(
                &format!("/v1/nodes/{id}/maintenance"),
                &json!({ "duration_secs": duration, "reason": reason }),
            )?;
            let task = v["maintenance"]["drain_task"].as_str().map(str::to_string);
            if out != Output::Json {
                maintenance_cells(&mut v, cairn_util::now_unix_ms());
            }
            print(out, &v, NODE_COLS);
            if let Some(task) = task.filter(|_| wait) {
                wait_drain(&api, &task, out)?;
            }
        }
        Cmd::Node(NodeCmd::Maintenance(MaintenanceCmd::End { id })) => print(
            out,
            &api()?.delete(&format!("/v1/nodes/{id}/maintenance"))?,
            NODE_COLS,
        ),
        Cmd::Cluster(ClusterCmd::Init {
            name,
            rpc_addr,
            api_addr,
            iscsi_addr,
        }) => {
            let dir = cli
                .conn
                .data_dir
                .as_deref()
                .context("cluster init needs --data-dir")?;
            let iscsi_addr = iscsi_addr.unwrap_or_else(|| config::default_iscsi_addr(rpc_addr));
            let cfg = setup::init(dir, &name, rpc_addr, api_addr, iscsi_addr)?;
            let v = json!({ "cluster_id": cfg.cluster_id, "node_id": cfg.node_id,
                "config": dir.join(CONFIG_FILE), "token_file": dir.join(config::TOKEN_FILE),
                "ca": dir.join("tls/ca.pem") });
            if out == Output::Json {
                println!("{v:#}");
            } else {
                println!(
                    "initialised cluster {} (node 1) in {}",
                    cfg.cluster_id,
                    dir.display()
                );
                println!(
                    "start it with: cairn node run --config {}",
                    dir.join(CONFIG_FILE).display()
                );
            }
        }
        Cmd::Cluster(ClusterCmd::Join {
            seed,
            rpc_addr,
            api_addr,
            iscsi_addr,
        }) => {
            let dir = cli
                .conn
                .data_dir
                .as_deref()
                .context("cluster join needs --data-dir for the new node")?;
            let token = cli
                .conn
                .token
                .clone()
                .context("cluster join needs --token")?;
            let ca_path = cli
                .conn
                .ca
                .clone()
                .context("cluster join needs --ca (the cluster CA certificate)")?;
            let ca = std::fs::read_to_string(&ca_path)
                .with_context(|| format!("cannot read CA {}", ca_path.display()))?;
            let iscsi_addr = iscsi_addr.unwrap_or_else(|| config::default_iscsi_addr(rpc_addr));
            let cfg = setup::join(dir, &seed, &ca, &token, rpc_addr, api_addr, iscsi_addr)?;
            if out == Output::Json {
                println!(
                    "{}",
                    json!({ "node_id": cfg.node_id, "cluster_id": cfg.cluster_id, "config": dir.join(CONFIG_FILE) })
                );
            } else {
                println!(
                    "node {} of cluster {} prepared in {}",
                    cfg.node_id,
                    cfg.cluster_id,
                    dir.display()
                );
                println!(
                    "start it with: cairn node run --config {} (it joins as learner, then voter)",
                    dir.join(CONFIG_FILE).display()
                );
            }
        }
        Cmd::Cluster(ClusterCmd::Status) => {
            let v = api()?.get("/v1/cluster")?;
            if out == Output::Json {
                println!("{v:#}");
            } else {
                println!(
                    "cluster {} ({})",
                    v["cluster_id"].as_str().unwrap_or(""),
                    v["name"].as_str().unwrap_or("")
                );
                println!(
                    "leader {}  term {}  commit {}  applied {}",
                    v["leader_id"], v["term"], v["commit_index"], v["applied_index"]
                );
                print(out, &v["nodes"], NODE_COLS);
            }
        }
        Cmd::Cluster(ClusterCmd::RemoveNode { id }) => {
            cli.conn
                .api(Duration::from_secs(60))?
                .delete(&format!("/v1/cluster/members/{id}"))?;
            println!("node {id} removed");
        }
        Cmd::Datastore(c) => {
            let api = api()?;
            match c {
                DatastoreCmd::Create {
                    name,
                    rf,
                    compression,
                } => {
                    let v = api.post("/v1/datastores", &json!({ "name": name, "replication_factor": rf, "compression": compression }))?;
                    print(out, &v, DS_COLS);
                }
                DatastoreCmd::List => print(out, &api.get("/v1/datastores")?, DS_COLS),
                DatastoreCmd::Get { name } => print(
                    out,
                    &api.get(&format!("/v1/datastores/{}", seg(&name)))?,
                    DS_COLS,
                ),
                DatastoreCmd::Delete { name } => {
                    api.delete(&format!("/v1/datastores/{}", seg(&name)))?;
                    if out == Output::Table {
                        println!("datastore {name} deleted");
                    }
                }
            }
        }
        Cmd::Vdisk(c) => {
            let api = api()?;
            match c {
                VdiskCmd::Create {
                    datastore,
                    name,
                    size,
                    owner,
                } => {
                    let body = json!({ "name": name, "size_bytes": parse_size(&size)?, "owner_node_id": owner.unwrap_or(0) });
                    print(
                        out,
                        &api.post(&format!("/v1/datastores/{}/vdisks", seg(&datastore)), &body)?,
                        VD_COLS,
                    );
                }
                VdiskCmd::List { datastore } => print(
                    out,
                    &api.get(&format!("/v1/datastores/{}/vdisks", seg(&datastore)))?,
                    VD_COLS,
                ),
                VdiskCmd::Get { datastore, name } => print(
                    out,
                    &api.get(&format!(
                        "/v1/datastores/{}/vdisks/{}",
                        seg(&datastore),
                        seg(&name)
                    ))?,
                    VD_COLS,
                ),
                VdiskCmd::Delete { datastore, name } => {
                    api.delete(&format!(
                        "/v1/datastores/{}/vdisks/{}",
                        seg(&datastore),
                        seg(&name)
                    ))?;
                    if out == Output::Table {
                        println!("vdisk {name} deleted");
                    }
                }
                VdiskCmd::Snapshot {
                    datastore,
                    name,
                    snapshot,
                } => {
                    let v = api.post(
                        &format!("{}/snapshots", vd_path(&datastore, &name)),
                        &json!({ "name": snapshot }),
                    )?;
                    print(out, &v, SNAP_COLS);
                }
                VdiskCmd::Snapshots { datastore, name } => print(
                    out,
                    &api.get(&format!("{}/snapshots", vd_path(&datastore, &name)))?,
                    SNAP_COLS,
                ),
                VdiskCmd::DeleteSnapshot {
                    datastore,
                    name,
                    snapshot,
                } => {
                    api.delete(&format!(
                        "{}/snapshots/{}",
                        vd_path(&datastore, &name),
                        seg(&snapshot)
                    ))?;
                    if out == Output::Table {
                        println!("snapshot {snapshot} deleted");
                    }
                }
                VdiskCmd::Clone {
                    datastore,
                    name,
                    snapshot,
                    clone,
                } => {
                    let v = api.post(
                        &format!(
                            "{}/snapshots/{}/clone",
                            vd_path(&datastore, &name),
                            seg(&snapshot)
                        ),
                        &json!({ "name": clone }),
                    )?;
                    print(out, &v, VD_COLS);
                }
                VdiskCmd::Resize {
                    datastore,
                    name,
                    size,
                } => {
                    let body = json!({ "size_bytes": parse_size(&size)? });
                    print(
                        out,
                        &api.post(
                            &format!(
                                "/v1/datastores/{}/vdisks/{}/resize",
                                seg(&datastore),
                                seg(&name)
                            ),
                            &body,
                        )?,
                        VD_COLS,
                    );
                }
            }
        }
        Cmd::Demo { root, nodes } => {
            demo::run(Path::new(&root), nodes)?;
        }
        Cmd::Iscsi(IscsiCmd::Target(c)) => iscsi_target(&api()?, c, out)?,
        Cmd::Task(TaskCmd::List) => print(out, &api()?.get("/v1/tasks")?, TASK_COLS),
        Cmd::Task(TaskCmd::Watch { id }) => watch_task(&api()?, id, out)?,
        Cmd::Extent(c) => extent(c, out, image)?,
    }
    Ok(())
}

fn iscsi_target(api: &Api, c: TargetCmd, out: Output) -> anyhow::Result<()> {
    match c {
        TargetCmd::Create {
            iqn,
            luns,
            chap_user,
            chap_secret,
            chap_secret_file,
            mutual_user,
            mutual_secret,
            mutual_secret_file,
            allow,
        } => {
            let luns = luns
                .iter()
                .map(|l| parse_lun(l))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let body = json!({
                "iqn": iqn,
                "luns": luns,
                "chap_user": chap_user.unwrap_or_default(),
                "chap_secret": read_secret(chap_secret, chap_secret_file)?,
                "mutual_user": mutual_user.unwrap_or_default(),
                "mutual_secret": read_secret(mutual_secret, mutual_secret_file)?,
                "allowed_initiators": allow,
            });
            print_targets(out, &api.post("/v1/iscsi/targets", &body)?);
        }
        TargetCmd::List => print_targets(out, &api.get("/v1/iscsi/targets")?),
        TargetCmd::Get { iqn } => print_targets(out, &api.get(&target_path(&iqn))?),
        TargetCmd::Delete { iqn } => {
            api.delete(&target_path(&iqn))?;
            if out == Output::Table {
                println!("iSCSI target {iqn} deleted");
            }
        }
        TargetCmd::Map { iqn, lun } => {
            let body = parse_lun(&lun)?;
            print_targets(
                out,
                &api.post(&format!("{}/luns", target_path(&iqn)), &body)?,
            );
        }
        TargetCmd::Unmap { iqn, lun } => {
            api.delete(&format!("{}/luns/{lun}", target_path(&iqn)))?;
            if out == Output::Table {
                println!("LUN {lun} of iSCSI target {iqn} unmapped");
            }
        }
    }
    Ok(())
}

fn extent(c: ExtentCmd, out: Output, image: Option<String>) -> anyhow::Result<()> {
    use cairn_data::inspect;
    match c {
        ExtentCmd::Inspect { file } => {
            print!("{}", inspect::inspect(&file)?);
            let report = inspect::verify_file(&file);
            if !report.is_empty() {
                bail!("{}: {}", file.display(), report.join("; "));
            }
        }
        ExtentCmd::Verify { dirs } => {
            let s = inspect::verify(&dirs);
            if out == Output::Json {
                let problems: Vec<_> = s
                    .problems
                    .iter()
                    .map(
                        |(p, w)| serde_json::json!({"file": p.display().to_string(), "problem": w}),
                    )
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({"files": s.files, "blocks_checked": s.blocks_checked, "problems": problems})
                );
            } else {
                for (p, w) in &s.problems {
                    println!("BAD  {}: {w}", p.display());
                }
                println!(
                    "{} files, {} blocks checked, {} problems",
                    s.files,
                    s.blocks_checked,
                    s.problems.len()
                );
            }
            if !s.problems.is_empty() {
                bail!(
                    "{} extent group file(s) failed verification",
                    s.problems.len()
                );
            }
        }
        ExtentCmd::Export {
            vdisk,
            dirs,
            generation,
            size,
        } => {
            let output = PathBuf::from(image.ok_or_else(|| {
                anyhow::anyhow!("extent export needs -o IMAGE (the file to write)")
            })?);
            let size = size.as_deref().map(parse_size).transpose()?;
            let s = inspect::export(&vdisk, &dirs, &output, generation, size)?;
            for (p, why) in &s.skipped {
                eprintln!("skipped {}: {why}", p.display());
            }
            println!(
                "wrote {} ({} bytes, {} blocks with data, from {} extent group files)",
                output.display(),
                s.size,
                s.blocks_written,
                s.files_used
            );
            if s.unrecoverable_blocks > 0 {
                bail!(
                    "{} block(s) had no verified copy in any file; they are zeros in the image",
                    s.unrecoverable_blocks
                );
            }
        }
    }
    Ok(())
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CAIRN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .init();
}

/// Entry point of the `cairn` binary (and of the test suite's node binary).
pub fn cli_main() -> ExitCode {
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{maintenance_cells, parse_duration_secs, parse_size};

    #[test]
    fn durations() {
        assert_eq!(parse_duration_secs("90"), Ok(90));
        assert_eq!(parse_duration_secs("90s"), Ok(90));
        assert_eq!(parse_duration_secs("20m"), Ok(1200));
        assert_eq!(parse_duration_secs("2h"), Ok(7200));
        assert_eq!(parse_duration_secs("1d"), Ok(86_400));
        assert!(parse_duration_secs("").is_err());
        assert!(parse_duration_secs("m").is_err());
        assert!(parse_duration_secs("5w").is_err());
        assert!(parse_duration_secs("-5m").is_err());
        assert!(parse_duration_secs("99999999999999999999d").is_err());
    }

    #[test]
    fn maintenance_shows_as_one_cell() {
        let mut v = serde_json::json!([
            { "id": 1 },
            { "id": 2, "maintenance": { "until_unix_ms": 1_000_000 + 125_000,
                "started_unix_ms": 1, "reason": "upgrade" } },
        ]);
        maintenance_cells(&mut v, 1_000_000);
        assert_eq!(v[0].get("maintenance"), None);
        assert_eq!(v[1]["maintenance"], "ends in 2m 05s (upgrade)");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10G").ok(), Some(10 << 30));
        assert_eq!(parse_size("512MiB").ok(), Some(512 << 20));
        assert_eq!(parse_size("4096").ok(), Some(4096));
        assert!(parse_size("ten").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
