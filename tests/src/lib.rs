//! Test harness: real `cairn` node processes (the `cairn-testnode` binary is
//! the same composition root), each with its own data folder and log, on its
//! own loopback address or inside its own network namespace. Nodes are
//! stopped by PID; namespaces and bridges are removed on drop.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod iscsi_client;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

pub const RPC_PORT: u16 = 7100;
pub const API_PORT: u16 = 8443;
/// Every node has its own IP (127.x.y.i or a namespace's), so the standard
/// iSCSI port never clashes between nodes, clusters or parallel tests.
pub const ISCSI_PORT: u16 = 3260;

static SERIAL: Mutex<()> = Mutex::new(());
static NEXT_BLOCK: AtomicU32 = AtomicU32::new(0);

/// Clusters on 2 cores must not compete with each other: one test at a time.
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// The node binary built by this package.
pub fn node_bin() -> PathBuf {
    if let Ok(p) = std::env::var("CAIRN_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/debug/deps/<test> -> target/debug/cairn-testnode
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("cairn-testnode")
}

/// A folder served by `cairn-lazyfs` (built by this package): a FUSE
/// passthrough that loses every write no fsync covered when told to crash.
/// Dropped without [`Self::crash`], it unmounts (losing the same).
pub struct LazyFs {
    child: Child,
    out: std::io::BufReader<std::process::ChildStdout>,
    pub backing: PathBuf,
    pub mountpoint: PathBuf,
}

impl LazyFs {
    /// Serves `backing` at `mountpoint` (an empty folder).
    pub fn mount(backing: &Path, mountpoint: &Path) -> Result<Self> {
        use std::io::BufRead;
        let bin = node_bin().with_file_name("cairn-lazyfs");
        let mut child = Command::new(&bin)
            .arg(backing)
            .arg(mountpoint)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut out = std::io::BufReader::new(child.stdout.take().context("lazyfs stdout")?);
        let mut line = String::new();
        out.read_line(&mut line)?;
        if line.trim() != "mounted" {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "cairn-lazyfs did not mount {}: {line:?}",
                mountpoint.display()
            );
        }
        Ok(Self {
            child,
            out,
            backing: backing.to_path_buf(),
            mountpoint: mountpoint.to_path_buf(),
        })
    }

    /// A power loss: every write no fsync covered is lost (all of it, or
    /// with `torn`, a seed, some of it at random), and the folder is
    /// unmounted. Whatever used it must be dead. Returns how many files
    /// lost writes.
    pub fn crash(mut self, torn: Option<u64>) -> Result<usize> {
        use std::io::{BufRead, Write};
        let cmd = match torn {
            Some(seed) => format!("crash torn {seed}\n"),
            None => "crash\n".to_string(),
        };
        if let Some(mut stdin) = self.child.stdin.take() {
            stdin.write_all(cmd.as_bytes())?;
        }
        let mut line = String::new();
        self.out.read_line(&mut line)?;
        let status = self.child.wait()?;
        anyhow::ensure!(status.success(), "cairn-lazyfs failed: {status:?} {line:?}");
        line.split_whitespace()
            .find_map(|w| w.parse().ok())
            .with_context(|| format!("cairn-lazyfs said {line:?}"))
    }
}

impl LazyFs {
    /// [`Self::crash`], then serves the same folder again (what survived the
    /// power loss); returns the new mount and how many files lost writes.
    pub fn power_cycle(self, torn: Option<u64>) -> Result<(Self, usize)> {
        let (backing, mountpoint) = (self.backing.clone(), self.mountpoint.clone());
        let lost = self.crash(torn)?;
        Ok((Self::mount(&backing, &mountpoint)?, lost))
    }
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

impl Cluster {
    /// Adds `line` (`key = value`) to the `[section]` table of node `i`'s
    /// `cairn.toml`; it takes effect at the node's next start.
    pub fn set_config(&self, i: usize, section: &str, line: &str) -> Result<()> {
        let path = self.nodes[i].dir.join("cairn.toml");
        let cfg = std::fs::read_to_string(&path)?;
        let header = format!("[{section}]\n");
        let cfg = if cfg.contains(&header) {
            cfg.replacen(&header, &format!("{header}{line}\n"), 1)
        } else {
            format!("{cfg}\n{header}{line}\n")
        };
        std::fs::write(&path, cfg)?;
        Ok(())
    }

    /// Moves node `i`'s folder onto a `cairn-lazyfs` mount at the same path
    /// (the node is stopped cleanly first and started again on it). Keep
    /// the result alive while the node runs.
    pub fn put_on_lazyfs(&mut self, i: usize) -> Result<LazyFs> {
        self.stop(i)?;
        let dir = self.nodes[i].dir.clone();
        let backing = dir.with_extension("backing");
        std::fs::rename(&dir, &backing)?;
        std::fs::create_dir(&dir)?;
        let fs = LazyFs::mount(&backing, &dir)?;
        self.spawn(i)?;
        Ok(fs)
    }
}

/// Runs a command to its end (stdin closed: QEMU and friends would
/// otherwise read the test's terminal).
pub fn sh(cmd: &str, args: &[&str]) -> Result<Output> {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd}"))?;
    Ok(out)
}

pub fn sh_ok(cmd: &str, args: &[&str]) -> Result<()> {
    let out = sh(cmd, args)?;
    if !out.status.success() {
        bail!(
            "{cmd} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Runs one nft command (a single argument; nft joins its words) inside `ns`.
fn nft(ns: &str, cmd: &str) -> Result<()> {
    sh_ok("ip", &["netns", "exec", ns, "nft", cmd])
}

/// Where a cluster's nodes live on the network.
#[derive(Debug, Clone)]
pub enum Net {
    /// Node i at 127.<a>.<b>.i.
    Loopback { prefix: String },
    /// Node i in namespace `<tag>n<i>` at <prefix>.i, joined by bridge `<tag>br`;
    /// the test process reaches them as <prefix>.254.
    Netns { tag: String, prefix: String },
}

pub struct NodeProc {
    pub id: u64,
    pub ip: String,
    pub dir: PathBuf,
    pub child: Option<Child>,
    pub ns: Option<String>,
}

impl NodeProc {
    pub fn api_addr(&self) -> String {
        format!("{}:{API_PORT}", self.ip)
    }
    pub fn rpc_addr(&self) -> String {
        format!("{}:{RPC_PORT}", self.ip)
    }
    /// The node's iSCSI portal (written into its config at init/join).
    pub fn iscsi_addr(&self) -> String {
        format!("{}:{ISCSI_PORT}", self.ip)
    }
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("node.log")
    }
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().and_then(|c| i32::try_from(c.id()).ok())
    }
}

/// A running test cluster.
pub struct Cluster {
    pub root: tempfile::TempDir,
    pub nodes: Vec<NodeProc>,
    pub net: Net,
    pub token: String,
    pub ca_pem: String,
    agent: ureq::Agent,
}

/// A cheap, clonable REST client bound to one node (for writer threads).
#[derive(Clone)]
pub struct NodeClient {
    agent: ureq::Agent,
    base: String,
    token: String,
}

impl NodeClient {
    pub fn request(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Reply> {
        let req = self
            .agent
            .request(method, &format!("{}{}", self.base, path))
            .set("Authorization", &format!("Bearer {}", self.token));
        Cluster::finish(match body {
            Some(b) => req.send_json(b.clone()),
            None => req.call(),
        })
    }
    pub fn post(&self, path: &str, body: &Value) -> Result<Reply> {
        self.request("POST", path, Some(body))
    }
    pub fn get(&self, path: &str) -> Result<Reply> {
        self.request("GET", path, None)
    }
}

/// A REST answer: status and JSON body.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub content_type: String,
}

impl Cluster {
    /// Starts `n` nodes on loopback and waits until all are voters.
    pub fn start(n: usize) -> Result<Self> {
        let block = NEXT_BLOCK.fetch_add(1, Ordering::SeqCst);
        let a = 100 + (std::process::id() % 100);
        let prefix = format!("127.{a}.{}", block % 250 + 1);
        Self::start_on(n, Net::Loopback { prefix })
    }

    /// Starts `n` nodes, each in its own network namespace.
    pub fn start_netns(n: usize) -> Result<Self> {
        let block = NEXT_BLOCK.fetch_add(1, Ordering::SeqCst);
        let tag = format!("c{}{}", std::process::id() % 100_000, block);
        let prefix = format!("10.{}.{}", 200 + (std::process::id() % 50), block % 250 + 1);
        let br = format!("{tag}br");
        sh_ok("ip", &["link", "add", &br, "type", "bridge"])?;
        sh_ok(
            "ip",
            &["addr", "add", &format!("{prefix}.254/24"), "dev", &br],
        )?;
        sh_ok("ip", &["link", "set", &br, "up"])?;
        Self::start_on(n, Net::Netns { tag, prefix })
    }

    fn start_on(n: usize, net: Net) -> Result<Self> {
        let root = tempfile::Builder::new().prefix("cairn-test-").tempdir()?;
        let mut c = Cluster {
            root,
            nodes: Vec::new(),
            net,
            token: String::new(),
            ca_pem: String::new(),
            agent: ureq::Agent::new(),
        };
        let first = c.new_node_slot(1)?;
        c.cli_ok(&[
            "--data-dir",
            first.dir.to_str().unwrap(),
            "cluster",
            "init",
            "--name",
            "test",
            "--rpc-addr",
            &first.rpc_addr(),
            "--api-addr",
            &first.api_addr(),
            "--iscsi-addr",
            &first.iscsi_addr(),
        ])?;
        c.token = std::fs::read_to_string(first.dir.join("admin.token"))?
            .trim()
            .to_string();
        c.ca_pem = std::fs::read_to_string(first.dir.join("tls/ca.pem"))?;
        let tls = cairn_rpc::tls::api_client_config(&c.ca_pem)?;
        c.agent = ureq::AgentBuilder::new()
            .tls_config(tls)
            .timeout_connect(Duration::from_secs(2))
            .timeout(Duration::from_secs(20))
            .build();
        c.nodes.push(first);
        c.spawn(0)?;
        c.wait_leader(Duration::from_secs(30))?;
        for _ in 1..n {
            c.add_node()?;
        }
        c.wait_voters(n, Duration::from_secs(120))?;
        Ok(c)
    }

    fn new_node_slot(&mut self, id: u64) -> Result<NodeProc> {
        let dir = self.root.path().join(format!("node{id}"));
        let (ip, ns) = match &self.net {
            Net::Loopback { prefix } => (format!("{prefix}.{id}"), None),
            Net::Netns { tag, prefix } => {
                let ns = format!("{tag}n{id}");
                let ip = format!("{prefix}.{id}");
                let host_if = format!("{tag}h{id}");
                let node_if = format!("{tag}v{id}");
                sh_ok("ip", &["netns", "add", &ns])?;
                sh_ok(
                    "ip",
                    &[
                        "link", "add", &host_if, "type", "veth", "peer", "name", &node_if,
                    ],
                )?;
                sh_ok("ip", &["link", "set", &node_if, "netns", &ns])?;
                sh_ok(
                    "ip",
                    &["link", "set", &host_if, "master", &format!("{tag}br")],
                )?;
                sh_ok("ip", &["link", "set", &host_if, "up"])?;
                sh_ok(
                    "ip",
                    &[
                        "-n",
                        &ns,
                        "addr",
                        "add",
                        &format!("{ip}/24"),
                        "dev",
                        &node_if,
                    ],
                )?;
                sh_ok("ip", &["-n", &ns, "link", "set", &node_if, "up"])?;
                sh_ok("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
                (ip, Some(ns))
            }
        };
        Ok(NodeProc {
            id,
            ip,
            dir,
            child: None,
            ns,
        })
    }

    /// Runs the CLI (in the root namespace).
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        Ok(Command::new(node_bin())
            .args(args)
            .stdin(Stdio::null())
            .output()?)
    }

    pub fn cli_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.cli(args)?;
        if !out.status.success() {
            bail!(
                "cairn {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// CLI arguments that point at node `i`'s API with the admin token.
    pub fn conn_args(&self, i: usize) -> Vec<String> {
        vec![
            "--endpoint".into(),
            self.nodes[i].api_addr(),
            "--token".into(),
            self.token.clone(),
            "--ca".into(),
            self.nodes[0].dir.join("tls/ca.pem").display().to_string(),
        ]
    }

    /// Starts node index `i`'s process.
    pub fn spawn(&mut self, i: usize) -> Result<()> {
        let node = &mut self.nodes[i];
        let log = File::options()
            .create(true)
            .append(true)
            .open(node.log_path())?;
        let config = node.dir.join("cairn.toml");
        let mut cmd = match &node.ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(node_bin());
                c
            }
            None => Command::new(node_bin()),
        };
        cmd.args(["node", "run", "--config"])
            .arg(&config)
            .env("CAIRN_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        node.child = Some(cmd.spawn()?);
        Ok(())
    }

    /// Prepares and starts one more node; it joins as learner, then voter.
    pub fn add_node(&mut self) -> Result<usize> {
        let id = self.nodes.iter().map(|n| n.id).max().unwrap_or(0) + 1;
        let slot = self.new_node_slot(id)?;
        let seed = self
            .nodes
            .iter()
            .find(|n| n.child.is_some())
            .map(NodeProc::api_addr)
            .ok_or_else(|| anyhow!("no running node"))?;
        let ca = self.nodes[0].dir.join("tls/ca.pem");
        self.cli_ok(&[
            "--data-dir",
            slot.dir.to_str().unwrap(),
            "--token",
            &self.token,
            "--ca",
            ca.to_str().unwrap(),
            "cluster",
            "join",
            "--seed",
            &seed,
            "--rpc-addr",
            &slot.rpc_addr(),
            "--api-addr",
            &slot.api_addr(),
            "--iscsi-addr",
            &slot.iscsi_addr(),
        ])?;
        let cfg = std::fs::read_to_string(slot.dir.join("cairn.toml"))?;
        if !cfg.contains(&format!("node_id = {id}")) {
            bail!("node was given an unexpected id: {cfg}");
        }
        self.nodes.push(slot);
        let i = self.nodes.len() - 1;
        self.spawn(i)?;
        Ok(i)
    }

    pub fn index_of(&self, id: u64) -> usize {
        self.nodes.iter().position(|n| n.id == id).expect("node id")
    }

    /// kill -9.
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait (clean stop; RocksDB flushed).
    pub fn stop(&mut self, i: usize) -> Result<()> {
        if let Some(mut c) = self.nodes[i].child.take() {
            if let Ok(pid) = i32::try_from(c.id()) {
                // SAFETY: kill(2) on a child we own; no memory is involved.
                #[allow(unsafe_code)]
                unsafe {
                    libc::kill(pid, libc::SIGTERM);
                }
            }
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if c.try_wait()?.is_some() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    bail!("node did not stop on SIGTERM");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    fn url(&self, i: usize, path: &str) -> String {
        format!("https://{}{}", self.nodes[i].api_addr(), path)
    }

    fn finish(r: std::result::Result<ureq::Response, ureq::Error>) -> Result<Reply> {
        let resp = match r {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => bail!("transport error: {e}"),
        };
        let status = resp.status();
        let content_type = resp.header("content-type").unwrap_or("").to_string();
        let text = resp.into_string().unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok(Reply {
            status,
            body,
            content_type,
        })
    }

    /// A client for node `i`'s REST API with the admin token.
    pub fn client(&self, i: usize) -> NodeClient {
        NodeClient {
            agent: self.agent.clone(),
            base: format!("https://{}", self.nodes[i].api_addr()),
            token: self.token.clone(),
        }
    }

    /// Authenticated request to node `i`.
    pub fn request(
        &self,
        i: usize,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Reply> {
        self.client(i).request(method, path, body)
    }

    /// Request with arbitrary headers and raw body (no token unless given).
    pub fn raw(
        &self,
        i: usize,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<Reply> {
        // One connection per request: after an odd request (a body the
        // handler never reads, a refused one) the server may close the
        // connection, and ureq reusing it from its pool saw "Unexpected EOF"
        // in the contract test now and then.
        let mut req = self
            .agent
            .request(method, &self.url(i, path))
            .set("Connection", "close");
        for (k, v) in headers {
            req = req.set(k, v);
        }
        Self::finish(req.send_bytes(body))
    }

    pub fn get(&self, i: usize, path: &str) -> Result<Reply> {
        self.request(i, "GET", path, None)
    }

    pub fn post(&self, i: usize, path: &str, body: &Value) -> Result<Reply> {
        self.request(i, "POST", path, Some(body))
    }

    /// Cluster status as node `i` sees it.
    pub fn status(&self, i: usize) -> Result<Value> {
        let r = self.get(i, "/v1/cluster")?;
        if r.status != 200 {
            bail!("status {}: {}", r.status, r.body);
        }
        Ok(r.body)
    }

    /// The leader agreed by the running nodes, if any.
    pub fn leader(&self) -> Option<u64> {
        let mut seen = None;
        for (i, n) in self.nodes.iter().enumerate() {
            if n.child.is_none() {
                continue;
            }
            let l = self.status(i).ok()?["leader_id"].as_u64()?;
            if l == 0 || seen.is_some_and(|s| s != l) {
                return None;
            }
            seen = Some(l);
        }
        seen
    }

    pub fn wait_leader(&self, timeout: Duration) -> Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.leader() {
                return Ok(l);
            }
            if Instant::now() > deadline {
                bail!("no leader within {timeout:?}\n{}", self.logs_tail());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the running node at index 0.. reports `n` voters.
    pub fn wait_voters(&self, n: usize, timeout: Duration) -> Result<Vec<u64>> {
        let deadline = Instant::now() + timeout;
        loop {
            for (i, node) in self.nodes.iter().enumerate() {
                if node.child.is_none() {
                    continue;
                }
                if let Ok(s) = self.status(i) {
                    let voters: Vec<u64> = s["voters"]
                        .as_array()
                        .map(|a| a.iter().filter_map(Value::as_u64).collect())
                        .unwrap_or_default();
                    if voters.len() == n && s["learners"].as_array().is_some_and(Vec::is_empty) {
                        return Ok(voters);
                    }
                }
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "cluster did not reach {n} voters within {timeout:?}\n{}",
                    self.logs_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Cuts node index `i` off from every other node (both ways); the test
    /// host (.254) still reaches it.
    pub fn partition(&self, i: usize) -> Result<()> {
        self.cut(i, true)
    }

    /// A one-way cut: node index `i` still sends to the other nodes but
    /// hears nothing from them (its answers and pings arrive, theirs do
    /// not); the test host still reaches it both ways.
    pub fn deafen(&self, i: usize) -> Result<()> {
        self.cut(i, false)
    }

    fn cut(&self, i: usize, both_ways: bool) -> Result<()> {
        let ns = self.nodes[i]
            .ns
            .as_deref()
            .ok_or_else(|| anyhow!("a cut needs a netns cluster"))?;
        let others: Vec<String> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, n)| n.ip.clone())
            .collect();
        let set = others.join(", ");
        let mut cmds = vec![
            "add table inet cairnpart".to_string(),
            "add chain inet cairnpart in { type filter hook input priority 0; policy accept; }"
                .to_string(),
            "add chain inet cairnpart out { type filter hook output priority 0; policy accept; }"
                .to_string(),
            format!("add rule inet cairnpart in ip saddr {{ {set} }} drop"),
        ];
        if both_ways {
            cmds.push(format!(
                "add rule inet cairnpart out ip daddr {{ {set} }} drop"
            ));
        }
        for cmd in cmds {
            nft(ns, &cmd)?;
        }
        Ok(())
    }

    pub fn heal(&self, i: usize) -> Result<()> {
        let ns = self.nodes[i]
            .ns
            .as_deref()
            .ok_or_else(|| anyhow!("heal needs a netns cluster"))?;
        nft(ns, "delete table inet cairnpart")
    }

    /// The last lines of every node's log, for failure messages.
    pub fn logs_tail(&self) -> String {
        let mut s = String::new();
        for n in &self.nodes {
            let log = n.log();
            let lines: Vec<&str> = log.lines().collect();
            let from = lines.len().saturating_sub(25);
            s.push_str(&format!(
                "---- node {} ({}) ----\n{}\n",
                n.id,
                n.log_path().display(),
                lines[from..].join("\n")
            ));
        }
        s
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill9(i);
        }
        if let Net::Netns { tag, .. } = &self.net {
            for n in &self.nodes {
                if let Some(ns) = &n.ns {
                    let _ = sh("ip", &["netns", "del", ns]);
                }
            }
            let _ = sh("ip", &["link", "del", &format!("{tag}br")]);
        }
        if std::env::var_os("CAIRN_KEEP_TEST_DIRS").is_some() {
            let p = self.root.path().to_path_buf();
            eprintln!("keeping test data in {}", p.display());
            std::mem::forget(std::mem::replace(
                &mut self.root,
                tempfile::tempdir().expect("tempdir"),
            ));
        }
    }
}

/// Runs `f(k)` for k in 0..n on `threads` threads; returns the results in order.
pub fn parallel<T: Send + 'static>(
    n: usize,
    threads: usize,
    f: impl Fn(usize) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let f = Arc::new(f);
    let next = Arc::new(AtomicU32::new(0));
    let out: Arc<Mutex<Vec<Option<T>>>> = Arc::new(Mutex::new((0..n).map(|_| None).collect()));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (f, next, out) = (f.clone(), next.clone(), out.clone());
            std::thread::spawn(move || loop {
                let k = next.fetch_add(1, Ordering::SeqCst) as usize;
                if k >= n {
                    break;
                }
                let r = f(k);
                out.lock().unwrap()[k] = Some(r);
            })
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
    let v = std::mem::take(&mut *out.lock().unwrap());
    v.into_iter().map(|x| x.expect("every task ran")).collect()
}

/// Block I/O against a vdisk through a node's data service (the same
/// `BlockDevice` the iSCSI and NFS front ends use, reached over the node's
/// mTLS RPC port with that node's certificate). Blocking, for test threads.
#[derive(Clone)]
pub struct BlockClient {
    rt: std::sync::Arc<tokio::runtime::Runtime>,
    client: cairn_api::data::v1::data_replica_client::DataReplicaClient<tonic::transport::Channel>,
    pub vdisk_id: String,
}

impl BlockClient {
    fn call(
        &self,
        op: cairn_api::data::v1::vdisk_io::Op,
        offset: u64,
        length: u64,
        data: Vec<u8>,
    ) -> Result<Vec<u8>> {
        self.call_as(op, offset, length, data, false)
    }
    /// `cached`: as a host with a write-back cache, which flushes; the
    /// write may stay volatile until [`Self::flush`]. Otherwise durable on return.
    fn call_as(
        &self,
        op: cairn_api::data::v1::vdisk_io::Op,
        offset: u64,
        length: u64,
        data: Vec<u8>,
        cached: bool,
    ) -> Result<Vec<u8>> {
        let mut c = self.client.clone();
        let req = cairn_api::data::v1::VdiskIo {
            format_version: 1,
            vdisk_id: self.vdisk_id.clone(),
            op: op as i32,
            offset,
            length,
            data: data.into(),
            fua: !cached,
            forwarded: false,
            cached,
        };
        self.rt
            .block_on(c.forward(req))
            .map(|r| r.into_inner().data)
            .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))
    }
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        use cairn_api::data::v1::vdisk_io::Op;
        self.call(Op::Write, offset, data.len() as u64, data.to_vec())
            .map(|_| ())
    }
    /// A write a write-back cache may keep volatile until [`Self::flush`].
    pub fn write_cached(&self, offset: u64, data: &[u8]) -> Result<()> {
        use cairn_api::data::v1::vdisk_io::Op;
        self.call_as(Op::Write, offset, data.len() as u64, data.to_vec(), true)
            .map(|_| ())
    }
    /// Makes every write acknowledged so far durable (SYNCHRONIZE CACHE).
    pub fn flush(&self) -> Result<()> {
        use cairn_api::data::v1::vdisk_io::Op;
        self.call(Op::Flush, 0, 0, Vec::new()).map(|_| ())
    }
    pub fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
        use cairn_api::data::v1::vdisk_io::Op;
        self.call(Op::Read, offset, len, Vec::new())
    }
    /// Writes `data` only if the range holds `expected` (atomically).
    pub fn compare_and_write(&self, offset: u64, expected: &[u8], data: &[u8]) -> Result<()> {
        use cairn_api::data::v1::vdisk_io::Op;
        self.call(
            Op::CompareAndWrite,
            offset,
            data.len() as u64,
            [expected, data].concat(),
        )
        .map(|_| ())
    }
    /// (offset, length, mapped) runs of a range (thin provisioning).
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64, bool)>> {
        let mut c = self.client.clone();
        let req = cairn_api::data::v1::VdiskIo {
            format_version: 1,
            vdisk_id: self.vdisk_id.clone(),
            op: cairn_api::data::v1::vdisk_io::Op::BlockStatus as i32,
            offset,
            length: len,
            data: Default::default(),
            fua: false,
            forwarded: false,
            cached: false,
        };
        let r = self
            .rt
            .block_on(c.forward(req))
            .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?;
        Ok(r.into_inner()
            .extents
            .into_iter()
            .map(|e| (e.offset, e.length, e.mapped))
            .collect())
    }
    pub fn unmap(&self, offset: u64, len: u64) -> Result<()> {
        use cairn_api::data::v1::vdisk_io::Op;
        self.call(Op::Unmap, offset, len, Vec::new()).map(|_| ())
    }
}

impl Cluster {
    /// A block client for `vdisk_id` through node `i`.
    pub fn block(&self, i: usize, vdisk_id: &str) -> Result<BlockClient> {
        let id = cairn_rpc::pki::TlsPaths::new(&self.nodes[i].dir).load_identity()?;
        let tls = cairn_rpc::tls::mtls_client_config(&id)?;
        let rt = std::sync::Arc::new(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?,
        );
        let rpc = self.nodes[i].rpc_addr();
        let ch = {
            let _g = rt.enter();
            cairn_rpc::dial::mtls_channel(&rpc, tls, Some(Duration::from_secs(30)))?
        };
        let client = cairn_api::data::v1::data_replica_client::DataReplicaClient::new(ch)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        Ok(BlockClient {
            rt,
            client,
            vdisk_id: vdisk_id.to_string(),
        })
    }

    /// Creates a datastore and a vdisk owned by node `owner` (index); returns the vdisk id.
    pub fn make_vdisk(
        &self,
        ds: &str,
        rf: u32,
        name: &str,
        size: u64,
        owner: usize,
    ) -> Result<String> {
        let r = self.post(
            0,
            "/v1/datastores",
            &serde_json::json!({"name": ds, "replication_factor": rf}),
        )?;
        anyhow::ensure!(
            r.status == 201 || r.status == 409,
            "datastore: {} {}",
            r.status,
            r.body
        );
        let r = self.post(
            0,
            &format!("/v1/datastores/{ds}/vdisks"),
            &serde_json::json!({"name": name, "size_bytes": size, "owner_node_id": self.nodes[owner].id}),
        )?;
        anyhow::ensure!(r.status == 201, "vdisk: {} {}", r.status, r.body);
        r.body["id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow::anyhow!("no id in {}", r.body))
    }

    /// Every node's data disk folders.
    pub fn disk_dirs(&self) -> Vec<PathBuf> {
        self.nodes.iter().map(|n| n.dir.join("disks")).collect()
    }
}
