//! `cairn-metabench`: drives one metadata workload against a Cairn cluster
//! (the `cairn.rpc.v1.Kv` RPC over mutual TLS) or an etcd cluster (etcd's v3
//! KV gRPC), and prints one machine-readable `key=value` line.
//!
//! Every client is its own tokio task with its own connection; it issues its
//! operations one after the other and times each of them. Clients are spread
//! round-robin over the endpoints in the order given (the first endpoint gets
//! client 0, so a single client talks to the first endpoint).
//!
//! Reads are linearizable on both systems: Cairn `linearizable: true`
//! (ReadIndex), etcd Range with the default consistency (`serializable` false).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cairn_api::rpc::v1::kv_client::KvClient;
use cairn_api::rpc::v1::raft_transport_client::RaftTransportClient;
use cairn_api::rpc::v1::{KvGetRequest, KvPutRequest, NodeStatusRequest};
use clap::{Parser, ValueEnum};
use rand::RngCore;
use tokio::sync::Barrier;
use tonic::transport::Channel;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Target {
    Cairn,
    Etcd,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Cairn => "cairn",
            Target::Etcd => "etcd",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Put,
    Get,
    /// Local read without a ReadIndex round (etcd: serializable). Not in the
    /// matrix: it separates the RPC's own cost from the quorum round.
    SerializableGet,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Put => "put",
            Mode::Get => "get",
            Mode::SerializableGet => "serializable-get",
        }
    }
}

#[derive(Parser)]
#[command(
    name = "cairn-metabench",
    about = "Cairn vs etcd metadata benchmark driver"
)]
struct Args {
    /// System under test.
    #[arg(long, value_enum)]
    target: Target,
    /// Comma-separated endpoints. Cairn: node RPC host:port. etcd: client URL
    /// host:port (http:// is added if missing).
    #[arg(long, value_delimiter = ',', required = true)]
    endpoints: Vec<String>,
    /// Cairn only: a node data folder whose TLS identity (tls/ca.pem,
    /// tls/node.pem, tls/node.key) is used as the client certificate.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Concurrent clients, each with its own connection.
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// Total operations over all clients (measured; one warm-up op per client is not).
    #[arg(long, default_value_t = 1000)]
    ops: usize,
    /// Value size in bytes (puts).
    #[arg(long, default_value_t = 1024)]
    value_size: usize,
    #[arg(long, value_enum, default_value_t = Mode::Put)]
    mode: Mode,
    /// Number of distinct keys; operation i uses key i % keyspace. Gets expect
    /// every key to exist (preload them with a put run of at least this many ops).
    #[arg(long, default_value_t = 1000)]
    keyspace: usize,
    #[arg(long, default_value = "metabench/")]
    key_prefix: String,
    /// Per-request timeout.
    #[arg(long, default_value_t = 10)]
    timeout_secs: u64,
    /// Print the endpoint (as given) of the current leader and exit.
    #[arg(long)]
    find_leader: bool,
}

enum Conn {
    Cairn(KvClient<Channel>),
    Etcd(Box<etcd_client::Client>),
}

impl Conn {
    async fn put(&mut self, key: Vec<u8>, value: Vec<u8>) -> anyhow::Result<()> {
        match self {
            Conn::Cairn(c) => {
                c.put(KvPutRequest { key, value }).await?;
            }
            Conn::Etcd(c) => {
                c.put(key, value, None).await?;
            }
        }
        Ok(())
    }

    /// A read; true if the key exists. Linearizable unless `serializable`.
    async fn get(&mut self, key: Vec<u8>, serializable: bool) -> anyhow::Result<bool> {
        Ok(match self {
            Conn::Cairn(c) => {
                c.get(KvGetRequest {
                    key,
                    linearizable: !serializable,
                })
                .await?
                .into_inner()
                .found
            }
            // GetOptions default: serializable = false, i.e. linearizable.
            Conn::Etcd(c) => {
                let opts = serializable.then(|| etcd_client::GetOptions::new().with_serializable());
                !c.get(key, opts).await?.kvs().is_empty()
            }
        })
    }
}

fn etcd_url(ep: &str) -> String {
    if ep.starts_with("http://") || ep.starts_with("https://") {
        ep.to_string()
    } else {
        format!("http://{ep}")
    }
}

struct Setup {
    target: Target,
    timeout: Duration,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Setup {
    async fn connect(&self, endpoint: &str) -> anyhow::Result<Conn> {
        match self.target {
            Target::Cairn => {
                let tls = self
                    .tls
                    .clone()
                    .context("Cairn needs --data-dir for its TLS identity")?;
                let ch = cairn_rpc::dial::mtls_channel(endpoint, tls, Some(self.timeout))?;
                Ok(Conn::Cairn(KvClient::new(ch)))
            }
            Target::Etcd => {
                let opts = etcd_client::ConnectOptions::new()
                    .with_timeout(self.timeout)
                    .with_connect_timeout(Duration::from_secs(2));
                let c = etcd_client::Client::connect([etcd_url(endpoint)], Some(opts))
                    .await
                    .with_context(|| format!("cannot connect to etcd at {endpoint}"))?;
                Ok(Conn::Etcd(Box::new(c)))
            }
        }
    }

    /// Asks every endpoint for its status (all must answer, which doubles as
    /// a readiness check) and returns the one that is the leader.
    async fn find_leader(&self, endpoints: &[String]) -> anyhow::Result<String> {
        let mut leader = None;
        let mut seen = Vec::new();
        for ep in endpoints {
            let (me, leader_id) = match self.target {
                Target::Cairn => {
                    let tls = self
                        .tls
                        .clone()
                        .context("Cairn needs --data-dir for its TLS identity")?;
                    let ch = cairn_rpc::dial::mtls_channel(ep, tls, Some(self.timeout))?;
                    let s = RaftTransportClient::new(ch)
                        .status(NodeStatusRequest {})
                        .await
                        .with_context(|| format!("status of {ep}"))?
                        .into_inner();
                    (s.node_id, s.leader_id)
                }
                Target::Etcd => {
                    let opts = etcd_client::ConnectOptions::new()
                        .with_timeout(self.timeout)
                        .with_connect_timeout(Duration::from_secs(2));
                    let mut c = etcd_client::Client::connect([etcd_url(ep)], Some(opts))
                        .await
                        .with_context(|| format!("cannot connect to etcd at {ep}"))?;
                    let s = c
                        .status()
                        .await
                        .with_context(|| format!("status of {ep}"))?;
                    (s.header().map(|h| h.member_id()).unwrap_or(0), s.leader())
                }
            };
            seen.push(leader_id);
            if me != 0 && leader_id == me {
                leader = Some(ep.clone());
            }
        }
        if seen.iter().any(|l| *l == 0 || Some(l) != seen.first()) {
            bail!("the endpoints do not agree on a leader yet: {seen:?}");
        }
        leader.context("no endpoint reports itself as the leader")
    }
}

struct ClientResult {
    latencies_us: Vec<u64>,
    errors: usize,
    /// Failed untimed warm-up reads (not part of `errors`).
    warmup_errors: usize,
    first_errors: Vec<String>,
}

fn key_of(prefix: &str, i: usize, keyspace: usize) -> Vec<u8> {
    format!("{prefix}{:08}", i % keyspace).into_bytes()
}

#[allow(clippy::too_many_arguments)]
async fn run_client(
    setup: Arc<Setup>,
    endpoint: String,
    mode: Mode,
    my_ops: Vec<usize>,
    keyspace: usize,
    prefix: Arc<String>,
    value: Arc<Vec<u8>>,
    barrier: Arc<Barrier>,
) -> ClientResult {
    let mut res = ClientResult {
        latencies_us: Vec::with_capacity(my_ops.len()),
        errors: 0,
        warmup_errors: 0,
        first_errors: Vec::new(),
    };
    fn note(res: &mut ClientResult, e: String) {
        res.errors += 1;
        keep(res, e);
    }
    fn keep(res: &mut ClientResult, e: String) {
        if res.first_errors.len() < 3 {
            res.first_errors.push(e);
        }
    }
    // Connect and warm up (one untimed linearizable read) before the start line.
    let conn = match setup.connect(&endpoint).await {
        Ok(mut c) => match c.get(key_of(&prefix, 0, keyspace), false).await {
            Ok(_) => Some(c),
            Err(e) => {
                res.warmup_errors += 1;
                keep(&mut res, format!("warm-up on {endpoint}: {e:#}"));
                Some(c)
            }
        },
        Err(e) => {
            keep(&mut res, format!("connect {endpoint}: {e:#}"));
            None
        }
    };
    barrier.wait().await;
    let Some(mut conn) = conn else {
        res.errors += my_ops.len();
        return res;
    };
    for i in my_ops {
        let key = key_of(&prefix, i, keyspace);
        let t0 = Instant::now();
        let r = match mode {
            Mode::Put => conn.put(key, value.as_ref().clone()).await,
            Mode::Get | Mode::SerializableGet => {
                match conn.get(key, mode == Mode::SerializableGet).await {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(anyhow::anyhow!(
                        "key {} not found (not preloaded?)",
                        i % keyspace
                    )),
                    Err(e) => Err(e),
                }
            }
        };
        let dt = t0.elapsed();
        match r {
            Ok(()) => res
                .latencies_us
                .push(u64::try_from(dt.as_micros()).unwrap_or(u64::MAX)),
            Err(e) => note(&mut res, format!("{endpoint}: {e:#}")),
        }
    }
    res
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

async fn real_main(args: Args) -> anyhow::Result<bool> {
    if args.clients == 0 || args.keyspace == 0 {
        bail!("--clients and --keyspace must be at least 1");
    }
    let tls = match (&args.data_dir, args.target) {
        (Some(d), _) => {
            let id = cairn_rpc::pki::TlsPaths::new(d)
                .load_identity()
                .with_context(|| format!("cannot load the TLS identity under {}", d.display()))?;
            Some(cairn_rpc::tls::mtls_client_config(&id)?)
        }
        (None, Target::Cairn) => bail!("--target cairn needs --data-dir (a node folder with tls/)"),
        (None, Target::Etcd) => None,
    };
    let setup = Arc::new(Setup {
        target: args.target,
        timeout: Duration::from_secs(args.timeout_secs),
        tls,
    });

    if args.find_leader {
        println!("{}", setup.find_leader(&args.endpoints).await?);
        return Ok(true);
    }

    let mut value = vec![0u8; args.value_size];
    rand::thread_rng().fill_bytes(&mut value);
    let value = Arc::new(value);
    let prefix = Arc::new(args.key_prefix.clone());
    let barrier = Arc::new(Barrier::new(args.clients + 1));

    let mut tasks = Vec::with_capacity(args.clients);
    for c in 0..args.clients {
        let my_ops: Vec<usize> = (c..args.ops).step_by(args.clients).collect();
        let endpoint = args.endpoints[c % args.endpoints.len()].clone();
        tasks.push(tokio::spawn(run_client(
            setup.clone(),
            endpoint,
            args.mode,
            my_ops,
            args.keyspace,
            prefix.clone(),
            value.clone(),
            barrier.clone(),
        )));
    }
    barrier.wait().await;
    let start = Instant::now();
    let mut lat = Vec::with_capacity(args.ops);
    let mut errors = 0usize;
    let mut warmup_errors = 0usize;
    let mut first_errors = Vec::new();
    for t in tasks {
        let r = t.await.context("client task panicked")?;
        lat.extend(r.latencies_us);
        errors += r.errors;
        warmup_errors += r.warmup_errors;
        first_errors.extend(r.first_errors);
    }
    let secs = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    let ok = lat.len();
    let mean = if ok == 0 {
        0
    } else {
        lat.iter().sum::<u64>() / ok as u64
    };
    for e in first_errors.iter().take(5) {
        eprintln!("cairn-metabench: error: {e}");
    }
    println!(
        "target={} mode={} clients={} ops={} errors={} warmup_errors={} value_size={} secs={:.3} ops_per_s={:.1} p50_us={} p99_us={} mean_us={} max_us={}",
        args.target.name(),
        args.mode.name(),
        args.clients,
        ok,
        errors,
        warmup_errors,
        args.value_size,
        secs,
        if secs > 0.0 { ok as f64 / secs } else { 0.0 },
        percentile(&lat, 0.50),
        percentile(&lat, 0.99),
        mean,
        lat.last().copied().unwrap_or(0),
    );
    Ok(ok > 0)
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cairn-metabench: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(real_main(args)) {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("cairn-metabench: no operation succeeded");
            std::process::ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("cairn-metabench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
