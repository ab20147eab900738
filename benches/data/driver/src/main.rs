//! `cairn-databench`: drives one block I/O workload against a Cairn vdisk or a
//! plain local file, and prints one machine-readable `key=value` line.
//!
//! Cairn: every I/O is a `cairn.data.v1.DataReplica/Forward` call (mutual TLS)
//! to one node, which runs it on the vdisk through the front-end trait
//! `cairn_data::frontend::BlockDevice`. A write returns once it is durable on
//! every replica. File: `pwrite` followed by `fdatasync` (durable too), or
//! `pread`, on one shared file descriptor.
//!
//! The queue depth is the number of workers (tokio tasks for Cairn, each with
//! its own connection; OS threads for the file), each with one I/O in flight.
//! Offsets are the same for both targets: sequential I/O takes the next slot
//! from a counter shared by the workers (wrapping at the working set); random
//! I/O draws slots from a generator seeded with `--seed` plus the worker index.
//!
//! Every 4 KiB block written carries its own byte offset in its first 8 bytes,
//! and reads check it, so a read cell proves it read data this driver wrote
//! (a thin vdisk would otherwise answer zeros without touching a disk).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context};
use cairn_api::data::v1::data_replica_client::DataReplicaClient;
use cairn_api::data::v1::{vdisk_io, VdiskIo};
use clap::{Parser, ValueEnum};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use tonic::transport::Channel;

/// Granularity of the offset stamps (the data service's checksum block).
const STAMP_UNIT: usize = 4096;
/// gRPC message limit, as the node's own clients use.
const MAX_MESSAGE: usize = 64 << 20;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Target {
    File,
    Cairn,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Write,
    Read,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Write => "write",
            Mode::Read => "read",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Pattern {
    Seq,
    Rand,
}

impl Pattern {
    fn name(self) -> &'static str {
        match self {
            Pattern::Seq => "seq",
            Pattern::Rand => "rand",
        }
    }
}

#[derive(Parser)]
#[command(
    name = "cairn-databench",
    about = "Cairn vdisk (front-end trait over DataReplica.Forward) vs local file block I/O driver"
)]
struct Args {
    /// System under test.
    #[arg(long, value_enum)]
    target: Target,
    /// Name printed as `target=` (default: file or cairn), e.g. rf2.
    #[arg(long)]
    label: Option<String>,
    /// File target: the file (created if missing; reads need it prefilled).
    #[arg(long)]
    file: Option<PathBuf>,
    /// Cairn target: a node's RPC address (host:port).
    #[arg(long)]
    endpoint: Option<String>,
    /// Cairn target: a node data folder whose TLS identity (tls/ca.pem,
    /// tls/node.pem, tls/node.key) is used as the client certificate.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Cairn target: the vdisk id.
    #[arg(long)]
    vdisk: Option<String>,
    #[arg(long, value_enum)]
    mode: Mode,
    #[arg(long, value_enum)]
    pattern: Pattern,
    /// I/O size in bytes, a multiple of 4096.
    #[arg(long)]
    bs: u64,
    /// Queue depth: concurrent workers, each with one I/O in flight.
    #[arg(long, default_value_t = 1)]
    qd: usize,
    /// Bytes at the start of the vdisk or file that the I/O covers.
    #[arg(long)]
    working_set: u64,
    /// Stop issuing I/O after this many seconds (0: no time limit).
    #[arg(long, default_value_t = 5.0)]
    secs: f64,
    /// Stop after this many I/Os in total (0: no count limit).
    #[arg(long, default_value_t = 0)]
    ops: u64,
    /// Seed of the random offsets (worker w uses seed + w).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Do not check the offset stamps of the data read.
    #[arg(long)]
    no_verify: bool,
    /// Per-request timeout (Cairn).
    #[arg(long, default_value_t = 30)]
    timeout_secs: u64,
}

/// What the workers share: the workload and the issue counter.
struct Plan {
    mode: Mode,
    pattern: Pattern,
    bs: u64,
    slots: u64,
    seed: u64,
    ops_cap: u64,
    secs: f64,
    verify: bool,
    issued: AtomicU64,
}

impl Plan {
    fn deadline(&self) -> Option<Instant> {
        (self.secs > 0.0).then(|| Instant::now() + Duration::from_secs_f64(self.secs))
    }

    fn rng(&self, worker: usize) -> StdRng {
        StdRng::seed_from_u64(self.seed.wrapping_add(worker as u64))
    }

    /// The byte offset of the worker's next I/O, or None when the run is over.
    fn next(&self, rng: &mut StdRng, deadline: Option<Instant>) -> Option<u64> {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return None;
        }
        let i = self.issued.fetch_add(1, Ordering::Relaxed);
        if self.ops_cap > 0 && i >= self.ops_cap {
            return None;
        }
        let slot = match self.pattern {
            Pattern::Seq => i % self.slots,
            Pattern::Rand => rng.gen_range(0..self.slots),
        };
        Some(slot * self.bs)
    }

    /// A write buffer of random bytes (stamped per I/O).
    fn payload(&self) -> Vec<u8> {
        let mut buf = vec![0u8; self.bs as usize];
        rand::thread_rng().fill_bytes(&mut buf);
        buf
    }

    fn check(&self, data: &[u8], offset: u64) -> anyhow::Result<()> {
        ensure!(
            data.len() as u64 == self.bs,
            "read at {offset} returned {} bytes, expected {}",
            data.len(),
            self.bs
        );
        if self.verify {
            check_stamps(data, offset)?;
        }
        Ok(())
    }
}

/// Writes each 4 KiB block's own byte offset into its first 8 bytes.
fn stamp(buf: &mut [u8], offset: u64) {
    for (k, block) in buf.chunks_mut(STAMP_UNIT).enumerate() {
        let at = offset + (k * STAMP_UNIT) as u64;
        block[..8].copy_from_slice(&at.to_le_bytes());
    }
}

fn check_stamps(data: &[u8], offset: u64) -> anyhow::Result<()> {
    for (k, block) in data.chunks(STAMP_UNIT).enumerate() {
        let at = offset + (k * STAMP_UNIT) as u64;
        let mut word = [0u8; 8];
        word.copy_from_slice(&block[..8]);
        let got = u64::from_le_bytes(word);
        ensure!(
            got == at,
            "block at byte {at} holds stamp {got}: not written by this driver (not prefilled?)"
        );
    }
    Ok(())
}

#[derive(Default)]
struct WorkerResult {
    latencies_us: Vec<u64>,
    errors: u64,
    /// Failed untimed warm-up reads (not part of `errors`).
    warmup_errors: u64,
    first_errors: Vec<String>,
}

impl WorkerResult {
    fn keep(&mut self, e: String) {
        if self.first_errors.len() < 3 {
            self.first_errors.push(e);
        }
    }

    fn record(&mut self, r: anyhow::Result<()>, dt: Duration) {
        match r {
            Ok(()) => self
                .latencies_us
                .push(u64::try_from(dt.as_micros()).unwrap_or(u64::MAX)),
            Err(e) => {
                self.errors += 1;
                self.keep(format!("{e:#}"));
            }
        }
    }
}

// ---- file target ---------------------------------------------------------------

fn file_worker(
    file: Arc<File>,
    plan: Arc<Plan>,
    worker: usize,
    barrier: Arc<std::sync::Barrier>,
) -> WorkerResult {
    let mut res = WorkerResult::default();
    let mut rng = plan.rng(worker);
    let mut buf = match plan.mode {
        Mode::Write => plan.payload(),
        Mode::Read => vec![0u8; plan.bs as usize],
    };
    barrier.wait();
    let deadline = plan.deadline();
    while let Some(off) = plan.next(&mut rng, deadline) {
        if plan.mode == Mode::Write {
            stamp(&mut buf, off);
        }
        let t0 = Instant::now();
        let io = match plan.mode {
            Mode::Write => file.write_all_at(&buf, off).and_then(|()| file.sync_data()),
            Mode::Read => file.read_exact_at(&mut buf, off),
        };
        let dt = t0.elapsed();
        let r = io
            .with_context(|| format!("{} at {off}", plan.mode.name()))
            .and_then(|()| match plan.mode {
                Mode::Read => plan.check(&buf, off),
                Mode::Write => Ok(()),
            });
        res.record(r, dt);
    }
    res
}

fn run_file(args: &Args, plan: &Arc<Plan>) -> anyhow::Result<(Vec<WorkerResult>, f64)> {
    let path = args.file.as_ref().context("--target file needs --file")?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let file = Arc::new(file);
    let barrier = Arc::new(std::sync::Barrier::new(args.qd + 1));
    let mut threads = Vec::with_capacity(args.qd);
    for w in 0..args.qd {
        let (file, plan, barrier) = (file.clone(), plan.clone(), barrier.clone());
        threads.push(
            std::thread::Builder::new()
                .name(format!("io-{w}"))
                .spawn(move || file_worker(file, plan, w, barrier))
                .context("cannot start a worker thread")?,
        );
    }
    barrier.wait();
    let start = Instant::now();
    let mut results = Vec::with_capacity(args.qd);
    for t in threads {
        results.push(t.join().map_err(|_| anyhow!("a worker thread panicked"))?);
    }
    Ok((results, start.elapsed().as_secs_f64()))
}

// ---- Cairn target --------------------------------------------------------------

fn vdisk_io(vdisk: &str, op: vdisk_io::Op, offset: u64, length: u64, data: Vec<u8>) -> VdiskIo {
    VdiskIo {
        format_version: 1,
        vdisk_id: vdisk.to_string(),
        op: op as i32,
        offset,
        length,
        data: data.into(),
        fua: true,
        forwarded: false,
        cached: false,
    }
}

async fn forward(client: &mut DataReplicaClient<Channel>, req: VdiskIo) -> anyhow::Result<Vec<u8>> {
    client
        .forward(req)
        .await
        .map(|r| r.into_inner().data)
        .map_err(|s| anyhow!("{:?}: {}", s.code(), s.message()))
}

async fn cairn_worker(
    mut client: DataReplicaClient<Channel>,
    vdisk: Arc<String>,
    plan: Arc<Plan>,
    worker: usize,
    barrier: Arc<tokio::sync::Barrier>,
) -> WorkerResult {
    let mut res = WorkerResult::default();
    let mut rng = plan.rng(worker);
    let mut buf = match plan.mode {
        Mode::Write => plan.payload(),
        Mode::Read => Vec::new(),
    };
    // Connect (TLS handshake) with one untimed 4 KiB read before the start line.
    let warm = vdisk_io(&vdisk, vdisk_io::Op::Read, 0, STAMP_UNIT as u64, Vec::new());
    if let Err(e) = forward(&mut client, warm).await {
        res.warmup_errors += 1;
        res.keep(format!("warm-up read: {e:#}"));
    }
    barrier.wait().await;
    let deadline = plan.deadline();
    while let Some(off) = plan.next(&mut rng, deadline) {
        let req = match plan.mode {
            Mode::Write => {
                stamp(&mut buf, off);
                vdisk_io(&vdisk, vdisk_io::Op::Write, off, plan.bs, buf.clone())
            }
            Mode::Read => vdisk_io(&vdisk, vdisk_io::Op::Read, off, plan.bs, Vec::new()),
        };
        let t0 = Instant::now();
        let r = forward(&mut client, req).await;
        let dt = t0.elapsed();
        let r = r
            .with_context(|| format!("{} at {off}", plan.mode.name()))
            .and_then(|data| match plan.mode {
                Mode::Read => plan.check(&data, off),
                Mode::Write => Ok(()),
            });
        res.record(r, dt);
    }
    res
}

async fn run_cairn(args: &Args, plan: &Arc<Plan>) -> anyhow::Result<(Vec<WorkerResult>, f64)> {
    let endpoint = args
        .endpoint
        .as_deref()
        .context("--target cairn needs --endpoint")?;
    let dir = args
        .data_dir
        .as_ref()
        .context("--target cairn needs --data-dir (a node folder with tls/)")?;
    let vdisk = Arc::new(
        args.vdisk
            .clone()
            .context("--target cairn needs --vdisk (the vdisk id)")?,
    );
    let id = cairn_rpc::pki::TlsPaths::new(dir)
        .load_identity()
        .with_context(|| format!("cannot load the TLS identity under {}", dir.display()))?;
    let tls = cairn_rpc::tls::mtls_client_config(&id)?;
    let timeout = Duration::from_secs(args.timeout_secs);
    let barrier = Arc::new(tokio::sync::Barrier::new(args.qd + 1));
    let mut tasks = Vec::with_capacity(args.qd);
    for w in 0..args.qd {
        // One connection per worker (the channel connects lazily, on the warm-up).
        let ch = cairn_rpc::dial::mtls_channel(endpoint, tls.clone(), Some(timeout))?;
        let client = DataReplicaClient::new(ch)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        tasks.push(tokio::spawn(cairn_worker(
            client,
            vdisk.clone(),
            plan.clone(),
            w,
            barrier.clone(),
        )));
    }
    barrier.wait().await;
    let start = Instant::now();
    let mut results = Vec::with_capacity(args.qd);
    for t in tasks {
        results.push(t.await.context("a worker task panicked")?);
    }
    Ok((results, start.elapsed().as_secs_f64()))
}

// ---- report --------------------------------------------------------------------

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn real_main(args: Args) -> anyhow::Result<bool> {
    if args.qd == 0 {
        bail!("--qd must be at least 1");
    }
    if args.bs == 0 || !args.bs.is_multiple_of(STAMP_UNIT as u64) {
        bail!("--bs must be a positive multiple of {STAMP_UNIT}");
    }
    if args.working_set < args.bs || !args.working_set.is_multiple_of(args.bs) {
        bail!("--working-set must be a positive multiple of --bs");
    }
    if args.secs <= 0.0 && args.ops == 0 {
        bail!("give --secs or --ops (or both): the run needs an end");
    }
    let plan = Arc::new(Plan {
        mode: args.mode,
        pattern: args.pattern,
        bs: args.bs,
        slots: args.working_set / args.bs,
        seed: args.seed,
        ops_cap: args.ops,
        secs: args.secs,
        verify: !args.no_verify,
        issued: AtomicU64::new(0),
    });
    let (results, secs) = match args.target {
        Target::File => run_file(&args, &plan)?,
        Target::Cairn => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("cannot start the tokio runtime")?;
            rt.block_on(run_cairn(&args, &plan))?
        }
    };

    let mut lat = Vec::new();
    let mut errors = 0u64;
    let mut warmup_errors = 0u64;
    let mut first_errors = Vec::new();
    for r in results {
        lat.extend(r.latencies_us);
        errors += r.errors;
        warmup_errors += r.warmup_errors;
        first_errors.extend(r.first_errors);
    }
    lat.sort_unstable();
    let ok = lat.len() as u64;
    let mean = lat.iter().sum::<u64>().checked_div(ok).unwrap_or(0);
    for e in first_errors.iter().take(5) {
        eprintln!("cairn-databench: error: {e}");
    }
    let iops = if secs > 0.0 { ok as f64 / secs } else { 0.0 };
    let label = args.label.clone().unwrap_or_else(|| {
        match args.target {
            Target::File => "file",
            Target::Cairn => "cairn",
        }
        .to_string()
    });
    println!(
        "target={} mode={} pattern={} bs={} qd={} ops={} errors={} warmup_errors={} secs={:.3} mb_per_s={:.1} iops={:.1} p50_us={} p99_us={} mean_us={} max_us={}",
        label,
        args.mode.name(),
        args.pattern.name(),
        args.bs,
        args.qd,
        ok,
        errors,
        warmup_errors,
        secs,
        iops * args.bs as f64 / 1e6,
        iops,
        percentile(&lat, 0.50),
        percentile(&lat, 0.99),
        mean,
        lat.last().copied().unwrap_or(0),
    );
    Ok(ok > 0)
}

fn main() -> std::process::ExitCode {
    match real_main(Args::parse()) {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("cairn-databench: no I/O succeeded");
            std::process::ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("cairn-databench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
