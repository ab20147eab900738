//! `cairn demo`: a local 3-node cluster on 127.0.0.1-3 with embedded defaults.
//! Each node is a real `cairn node run` process with its own data folder and
//! log file; Ctrl-C stops them all cleanly. Running it again restarts the
//! same cluster from its folders.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use serde_json::json;

use crate::client::{Api, ApiError};
use crate::config::{read_token, NodeConfig, CONFIG_FILE};
use crate::setup;

const RPC_PORT: u16 = 7100;
const API_PORT: u16 = 8443;
const ISCSI_PORT: u16 = crate::config::ISCSI_PORT;
/// What the demo exports: one thin vdisk as LUN 0 of one target.
pub const DEMO_IQN: &str = "iqn.2026-11.io.cairn:demo";
const DEMO_DATASTORE: &str = "demo";
const DEMO_VDISK: &str = "demo";
const DEMO_VDISK_BYTES: u64 = 4 << 30;

struct Node {
    id: usize,
    dir: PathBuf,
    child: Child,
}

fn spawn(exe: &Path, dir: &Path, id: usize) -> anyhow::Result<Node> {
    let log = dir.join("node.log");
    let out = File::options().create(true).append(true).open(&log)?;
    let child = Command::new(exe)
        .args(["node", "run", "--config"])
        .arg(dir.join(CONFIG_FILE))
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("cannot start node {id}"))?;
    Ok(Node {
        id,
        dir: dir.to_path_buf(),
        child,
    })
}

fn wait_healthy(api: &Api, node: &mut Node, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if api.get("/v1/health").is_ok() {
            return Ok(());
        }
        if let Some(status) = node.child.try_wait()? {
            bail!(
                "node {} exited ({status}); see {}",
                node.id,
                node.dir.join("node.log").display()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "node {} did not become healthy; see {}",
                node.id,
                node.dir.join("node.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn stop_all(nodes: &mut [Node]) {
    for n in nodes.iter() {
        if let Ok(pid) = i32::try_from(n.child.id()) {
            #[allow(unsafe_code)]
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    for n in nodes.iter_mut() {
        while Instant::now() < deadline {
            if let Ok(Some(_)) = n.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = n.child.kill();
        let _ = n.child.wait();
    }
}

/// Creates the demo datastore, vdisk and target unless they exist (a
/// restarted demo keeps what it had).
fn export_demo_vdisk(api: &Api, nodes: usize) -> anyhow::Result<()> {
    // A restarted cluster has its voters at once but elects a leader a
    // moment later: retry what is transient, for a while.
    let deadline = Instant::now() + Duration::from_secs(60);
    let create = |path: &str, body: serde_json::Value| loop {
        match api.post(path, &body) {
            Ok(_) | Err(ApiError::Problem { status: 409, .. }) => return Ok(()),
            Err(ApiError::Problem { status: 503, .. } | ApiError::Unreachable { .. })
                if Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => return Err(e),
        }
    };
    let rf = nodes.clamp(1, 2);
    create(
        "/v1/datastores",
        json!({ "name": DEMO_DATASTORE, "replication_factor": rf }),
    )
    .context("cannot create the demo datastore")?;
    create(
        &format!("/v1/datastores/{DEMO_DATASTORE}/vdisks"),
        json!({ "name": DEMO_VDISK, "size_bytes": DEMO_VDISK_BYTES }),
    )
    .context("cannot create the demo vdisk")?;
    create(
        "/v1/iscsi/targets",
        json!({
            "iqn": DEMO_IQN,
            "luns": [{ "lun": 0, "vdisk": format!("{DEMO_DATASTORE}/{DEMO_VDISK}") }],
        }),
    )
    .context("cannot create the demo iSCSI target")?;
    Ok(())
}

pub fn run(root: &Path, count: usize) -> anyhow::Result<()> {
    if !(1..=9).contains(&count) {
        bail!("--nodes must be between 1 and 9");
    }
    let exe = std::env::current_exe()?;
    std::fs::create_dir_all(root)?;
    let root = root.canonicalize()?;
    let dirs: Vec<PathBuf> = (1..=count).map(|i| root.join(format!("node{i}"))).collect();
    let addr = |i: usize, port: u16| -> anyhow::Result<std::net::SocketAddr> {
        Ok(format!("127.0.0.{i}:{port}").parse()?)
    };

    if !dirs[0].join(CONFIG_FILE).exists() {
        println!(
            "creating a new {count}-node cluster under {}",
            root.display()
        );
        setup::init(
            &dirs[0],
            "demo",
            addr(1, RPC_PORT)?,
            addr(1, API_PORT)?,
            addr(1, ISCSI_PORT)?,
        )?;
    } else {
        println!("restarting the cluster under {}", root.display());
    }
    let token = read_token(&dirs[0])?;
    let ca_pem = std::fs::read_to_string(dirs[0].join("tls/ca.pem"))?;
    let seed = addr(1, API_PORT)?.to_string();

    let mut nodes: Vec<Node> = Vec::new();
    let result = (|| -> anyhow::Result<()> {
        nodes.push(spawn(&exe, &dirs[0], 1)?);
        let seed_api = Api::new(&seed, &ca_pem, token.clone(), Duration::from_secs(180))?;
        wait_healthy(&seed_api, &mut nodes[0], Duration::from_secs(60))?;
        for (i, dir) in dirs.iter().enumerate().skip(1) {
            let n = i + 1;
            if !dir.join(CONFIG_FILE).exists() {
                setup::join(
                    dir,
                    &seed,
                    &ca_pem,
                    &token,
                    addr(n, RPC_PORT)?,
                    addr(n, API_PORT)?,
                    addr(n, ISCSI_PORT)?,
                )?;
            }
            nodes.push(spawn(&exe, dir, n)?);
        }
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            if let Ok(s) = seed_api.get("/v1/cluster") {
                if s["voters"].as_array().map_or(0, Vec::len) >= count {
                    break;
                }
            }
            for n in nodes.iter_mut() {
                if let Some(status) = n.child.try_wait()? {
                    bail!(
                        "node {} exited ({status}); see {}",
                        n.id,
                        n.dir.join("node.log").display()
                    );
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "the cluster did not reach {count} voters in time; see the node logs under {}",
                    root.display()
                );
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        export_demo_vdisk(&seed_api, count)
    })();
    if let Err(e) = result {
        stop_all(&mut nodes);
        return Err(e);
    }

    println!("\nCairn demo cluster is up ({count} nodes). Ctrl-C stops it.\n");
    for (i, dir) in dirs.iter().enumerate() {
        let cfg = NodeConfig::load(&dir.join(CONFIG_FILE))?;
        println!("node {}:", i + 1);
        println!("  REST API   https://{}/v1/health", cfg.api_addr);
        println!("  node RPC   {} (mTLS, cluster CA)", cfg.rpc_addr);
        println!("  iSCSI      {} (portal)", cfg.iscsi_addr());
        println!("  data       {}", dir.display());
        for (disk, _) in cfg.data_disks() {
            println!(
                "  disk       {} (extent groups; files stand in for flash)",
                disk.display()
            );
        }
        println!("  log        {}", dir.join("node.log").display());
    }
    let portal = NodeConfig::load(&dirs[0].join(CONFIG_FILE))?.iscsi_addr();
    println!(
        "\niSCSI target {DEMO_IQN}: LUN 0 is vdisk {DEMO_DATASTORE}/{DEMO_VDISK} ({} GiB, thin); \
         log in through any node's portal",
        DEMO_VDISK_BYTES >> 30
    );
    println!("  URL        iscsi://{portal}/{DEMO_IQN}/0");
    println!("  try        qemu-img info iscsi://{portal}/{DEMO_IQN}/0");
    println!("\nCA certificate: {}", dirs[0].join("tls/ca.pem").display());
    println!(
        "Admin token:    {} (mode 0600)",
        dirs[0].join("admin.token").display()
    );
    println!(
        "Try:            cairn --data-dir {} cluster status",
        dirs[0].display()
    );
    println!(
        "                cairn --data-dir {} datastore create gold --rf 2\n",
        dirs[0].display()
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
        Ok::<(), anyhow::Error>(())
    })?;
    println!("stopping the demo cluster...");
    stop_all(&mut nodes);
    println!("stopped.");
    Ok(())
}
