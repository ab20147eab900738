//! Failure handling: the monitor loop every node runs.
//!
//! - Liveness: every node pings every other node's data service; a node
//!   silent for [`DEAD_AFTER`] is dead for placement, failover and repair.
//! - Ownership: the metadata leader moves each vdisk whose owner is dead to
//!   the live node holding most of its replicas (`SetVdiskOwner`, which bumps
//!   the owner epoch); the new owner fences the old one group by group when
//!   it takes each over (`Volume::ensure_ready`).
//! - Re-replication: each owner drops dead or missing replicas of its groups
//!   and copies the groups to new nodes until they have RF replicas again,
//!   throttled to [`MonitorConfig::rebuild_bytes_per_sec`], reported as a
//!   `rebuild` task with progress.
//! - Scrub: each owner re-reads its groups from every replica at
//!   [`MonitorConfig::scrub_bytes_per_sec`]; a replica whose blocks fail
//!   verification is repaired (local) or replaced (remote).
//! - Garbage: replica files of groups that metadata no longer lists for this
//!   node are deleted after a grace period.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_api::data::v1::{RecordKind, ReplicaListRequest, ReplicaReadReply, ReplicaWrite};
use cairn_api::metadata::v1::{
    command::Op, ExtentGroupRecord, PutKv, ReplicaLocation, SetVdiskOwner, TaskRecord, TaskState,
};
use futures::future::join_all;
use futures::StreamExt as _;
use prost::Message as _;
use tokio::sync::watch;

use crate::catchup;
use crate::format::{self, BLOCK_SIZE};
use crate::volume::{group_block_count, lock, meta_err, DataService, GroupState, Target, Volume};
use crate::DataError;

/// A node that has not answered pings for this long is dead.
pub const DEAD_AFTER: Duration = Duration::from_secs(5);
/// How long a local replica must stay unreferenced before it is deleted.
pub const ORPHAN_GRACE: Duration = Duration::from_secs(30);
/// Default of [`MonitorConfig::rebuild_wait`]: long enough for a node's
/// restart or a reboot of its VM (an upgrade), short enough that a node
/// that is gone does not leave its groups with a replica fewer for long.
/// Ceph waits 10 minutes before it marks an OSD out, Longhorn 10 before it
/// replenishes a replica.
pub const REBUILD_WAIT: Duration = Duration::from_secs(300);
/// A catch-up with more data runs than this reads their whole span from
/// the source at once.
const SPAN_READ_AFTER: usize = 16;
/// Copy records of one catch-up in flight to the target at once.
const COPIES_IN_FLIGHT: usize = 32;
/// Key prefix of task records in the metadata key-value space.
pub const TASK_PREFIX: &str = "tasks/";

/// How long a group that lost a replica on a node that could not be
/// reached waits for that node: the monitor's `rebuild_wait` from the
/// drop, or longer while the node has a maintenance mark
/// (`NodeMaintenance`, read once per pass).
struct Waits {
    wait: Duration,
    /// node id -> end of its maintenance mark (unix ms), unexpired ones only.
    maintenance: HashMap<u64, u64>,
    /// (group, node) -> since when (unix ms): the away marks in metadata,
    /// whichever owner wrote them.
    away: HashMap<(u64, u64), u64>,
}

impl Waits {
    fn read(meta: &cairn_metadata::MetadataHandle, wait: Duration) -> Self {
        let away = match meta.away_replicas() {
            Ok(marks) => marks
                .into_iter()
                .map(|m| ((m.extent_group_id, m.node_id), m.since_unix_ms))
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read away marks");
                HashMap::new()
            }
        };
        // Without the marks the plain wait still holds: the conservative
        // side (a rebuild) once it has passed.
        let maintenance = crate::drain::current_marks(meta)
            .into_values()
            .map(|m| (m.node_id, m.until_unix_ms))
            .collect();
        Self {
            wait,
            maintenance,
            away,
        }
    }

    /// Whether a replica dropped on `node` at `since` (unix ms) is still
    /// waited for.
    fn holds(&self, node: u64, since: u64) -> bool {
        let waited = cairn_util::now_unix_ms().saturating_sub(since);
        u128::from(waited) < self.wait.as_millis() || self.maintenance.contains_key(&node)
    }
}

/// Of `candidates`, the node holding most replicas of `groups` (those on
/// `excluded` nodes do not count), the lowest id among equals: a vdisk's
/// new owner, which then reads most of it locally.
pub(crate) fn most_replicas(
    groups: &[&ExtentGroupRecord],
    excluded: &HashSet<u64>,
    candidates: &[u64],
) -> Option<u64> {
    let mut held: HashMap<u64, usize> = HashMap::new();
    for r in groups.iter().flat_map(|g| &g.replicas) {
        if !excluded.contains(&r.node_id) {
            *held.entry(r.node_id).or_default() += 1;
        }
    }
    candidates
        .iter()
        .copied()
        .max_by_key(|id| (held.get(id).copied().unwrap_or(0), u64::MAX - id))
}

/// Tunables of the monitor.
#[derive(Debug, Clone)]
pub struct MonitorConfig {
    pub interval: Duration,
    pub rebuild_bytes_per_sec: u64,
    /// How long a group whose replica was dropped while its node could not
    /// be reached waits for that node to come back (and be caught up with
    /// what it missed) before it is rebuilt on another node. Zero rebuilds
    /// at once.
    pub rebuild_wait: Duration,
    /// 0 disables the scrubber.
    pub scrub_bytes_per_sec: u64,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(2),
            rebuild_bytes_per_sec: 200 << 20,
            rebuild_wait: REBUILD_WAIT,
            scrub_bytes_per_sec: 16 << 20,
        }
    }
}

/// What the liveness loop knows: when each node last answered a ping, and
/// which ones are dead now.
#[derive(Default)]
struct Liveness {
    last_ok: HashMap<u64, Instant>,
    dead: HashSet<u64>,
}

/// Builds a copy record for one group (kind, sequence, first block, block
/// count, data, whether it may create the file).
type CopyWrite<'a> = dyn Fn(RecordKind, u64, u32, u32, Vec<u8>, bool) -> ReplicaWrite + Sync + 'a;

/// One group a re-replication pass works on.
struct RepairWork {
    vol: Arc<Volume>,
    g: ExtentGroupRecord,
    /// Replicas to drop from its set.
    lost: Vec<u64>,
    /// Live nodes outside its set that still hold a readable copy (a
    /// replica dropped while its node was away): caught up first.
    stale: Vec<u64>,
}

/// What bringing one replica back took.
#[derive(Debug, Clone, Copy, Default)]
struct Copied {
    /// Only the blocks it missed were copied.
    caught_up: bool,
    /// Block data sent.
    bytes: u64,
}

/// What a re-replication pass did, for its task and its log line.
#[derive(Debug, Default)]
struct CopyTally {
    /// Replicas dropped from their groups' sets.
    dropped: u64,
    caught_up: u64,
    caught_up_blocks: u64,
    whole: u64,
    whole_blocks: u64,
}

impl CopyTally {
    fn add(&mut self, c: &Copied) {
        let blocks = c.bytes / BLOCK_SIZE as u64;
        if c.caught_up {
            self.caught_up += 1;
            self.caught_up_blocks += blocks;
        } else {
            self.whole += 1;
            self.whole_blocks += blocks;
        }
    }
}

impl std::fmt::Display for CopyTally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} caught up ({} KiB missed), {} copied whole ({} KiB); {} replica(s) dropped",
            self.caught_up,
            self.caught_up_blocks * BLOCK_SIZE as u64 / 1024,
            self.whole,
            self.whole_blocks * BLOCK_SIZE as u64 / 1024,
            self.dropped
        )
    }
}

/// State the monitor keeps between passes.
#[derive(Default)]
struct MonitorState {
    /// Local groups found unreferenced, and when first seen so.
    orphans: HashMap<u64, Instant>,
    scrub_cursor: usize,
    /// Highest sequence any replica of a group had at the previous pass.
    seen_max: HashMap<u64, u64>,
    /// Groups waiting for their replicas' nodes, as last reported.
    waiting_logged: usize,
    /// The task that shows them, while any wait, and when it was last put.
    wait_task: Option<TaskRecord>,
    wait_put_at: Option<Instant>,
    /// This node's tasks left running by its previous run were closed.
    tasks_swept: bool,
    /// The drain tasks, while this node is the metadata leader.
    drains: crate::drain::Drains,
}

/// How often a running rebuild-wait task is rewritten when nothing but
/// time changed (the maintenance time left in its message).
const WAIT_TASK_REFRESH: Duration = Duration::from_secs(10);

impl DataService {
    /// Runs the monitor until `stop`.
    pub async fn run_monitor(self: Arc<Self>, cfg: MonitorConfig, mut stop: watch::Receiver<bool>) {
        // Pings run on their own: a repair or scrub pass that waits on a
        // silent node (each call up to its timeout) must not hold back
        // finding it dead, which is what makes calls to it fail at once.
        let liveness = Arc::new(Mutex::new(Liveness::default()));
        tokio::spawn(
            self.clone()
                .run_liveness(cfg.interval, liveness.clone(), stop.clone()),
        );
        let mut st = MonitorState::default();
        let mut last_err = String::new();
        loop {
            if !st.tasks_swept {
                st.tasks_swept = self.sweep_stale_tasks().await;
            }
            let dead = lock(&liveness).dead.clone();
            match self.monitor_pass(&cfg, &mut st, &dead).await {
                // Log a failure once, not every pass.
                Err(e) if e.to_string() != last_err => {
                    tracing::warn!(error = %e, "data monitor pass incomplete");
                    last_err = e.to_string();
                }
                Err(_) => {}
                Ok(()) => last_err.clear(),
            }
            tokio::select! {
                _ = tokio::time::sleep(cfg.interval) => {}
                _ = stop.changed() => return,
            }
        }
    }

    async fn ping(&self, node: u64) -> bool {
        let Ok(Target::Remote(id, addr)) = self.target(node) else {
            return node == self.node_id;
        };
        let Ok(mut c) = self.peers.client(id, &addr) else {
            return false;
        };
        let call = c.ping(cairn_api::data::v1::PingRequest {});
        matches!(
            tokio::time::timeout(Duration::from_secs(1), call).await,
            Ok(Ok(_))
        )
    }

    /// Pings every member each `every` until `stop`, and keeps the verdict
    /// (dead: silent for [`DEAD_AFTER`]) in `liveness` and in the peers.
    async fn run_liveness(
        self: Arc<Self>,
        every: Duration,
        liveness: Arc<Mutex<Liveness>>,
        mut stop: watch::Receiver<bool>,
    ) {
        let started = Instant::now();
        loop {
            if let Ok(nodes) = self.meta.nodes() {
                let me = &self;
                let pings = join_all(
                    nodes
                        .iter()
                        .map(|n| async move { (n.id, me.ping(n.id).await) }),
                )
                .await;
                let now = Instant::now();
                let mut l = lock(&liveness);
                for (id, ok) in pings {
                    if ok {
                        l.last_ok.insert(id, now);
                        self.peers.observe::<()>(id, &Ok(()));
                    }
                }
                let dead: HashSet<u64> = nodes
                    .iter()
                    .map(|n| n.id)
                    .filter(|id| *id != self.node_id)
                    .filter(|id| match l.last_ok.get(id) {
                        Some(t) => now - *t > DEAD_AFTER,
                        // Never seen since we started: dead once we waited long enough.
                        None => now - started > DEAD_AFTER * 2,
                    })
                    .collect();
                for n in &nodes {
                    if n.id == self.node_id {
                        continue;
                    }
                    if dead.contains(&n.id) {
                        self.peers
                            .observe::<()>(n.id, &Err(DataError::Unavailable("no ping".into())));
                    }
                    self.peers.set_dead(n.id, dead.contains(&n.id));
                }
                l.dead = dead;
            }
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.changed() => return,
            }
        }
    }

    async fn monitor_pass(
        self: &Arc<Self>,
        cfg: &MonitorConfig,
        st: &mut MonitorState,
        dead: &HashSet<u64>,
    ) -> Result<(), DataError> {
        let nodes = self.meta.nodes().map_err(meta_err)?;
        let members: HashSet<u64> = nodes.iter().map(|n| n.id).collect();

        if self
            .meta
            .status()
            .await
            .map(|s| s.role == "leader")
            .unwrap_or(false)
        {
            self.fail_over_owners(dead).await?;
            self.drain_maintenance(dead, &mut st.drains).await?;
        } else {
            st.drains.resign();
        }
        let repaired = self.repair_owned(cfg, dead, &members, st).await?;
        if !repaired && cfg.scrub_bytes_per_sec > 0 {
            self.scrub_some(cfg, st).await?;
        }
        self.collect_garbage(st).await
    }

    /// Moves vdisks away from dead owners (metadata leader only).
    async fn fail_over_owners(&self, dead: &HashSet<u64>) -> Result<(), DataError> {
        if dead.is_empty() {
            return Ok(());
        }
        let groups = self.meta.extent_groups().map_err(meta_err)?;
        let candidates: Vec<u64> = self
            .node_ids()?
            .into_iter()
            .filter(|id| !dead.contains(id))
            .collect();
        for vd in self.meta.all_vdisks().map_err(meta_err)? {
            if !dead.contains(&vd.owner_node_id) {
                continue;
            }
            let of_vd: Vec<&ExtentGroupRecord> =
                groups.iter().filter(|g| g.vdisk_id == vd.id).collect();
            let Some(new_owner) = most_replicas(&of_vd, dead, &candidates) else {
                continue;
            };
            match self.set_vdisk_owner(&vd, new_owner).await {
                Ok(()) => tracing::warn!(vdisk = %vd.id, name = %vd.name, from = vd.owner_node_id,
                    to = new_owner, owner_epoch = vd.owner_epoch + 1,
                    "vdisk owner is dead; ownership moved to a surviving replica holder"),
                Err(e) => tracing::warn!(vdisk = %vd.id, error = %e, "cannot move vdisk ownership"),
            }
        }
        Ok(())
    }

    /// Every member's node id (metadata's node records).
    pub(crate) fn node_ids(&self) -> Result<Vec<u64>, DataError> {
        Ok(self
            .meta
            .nodes()
            .map_err(meta_err)?
            .into_iter()
            .map(|n| n.id)
            .collect())
    }

    /// Moves a vdisk's ownership to `to` if it is still at the owner epoch
    /// `vd` names (`SetVdiskOwner` bumps it; the new owner fences the old
    /// one as it takes each group over).
    pub(crate) async fn set_vdisk_owner(
        &self,
        vd: &cairn_api::metadata::v1::VdiskRecord,
        to: u64,
    ) -> Result<(), DataError> {
        self.meta
            .propose(Op::SetVdiskOwner(SetVdiskOwner {
                vdisk_id: vd.id.clone(),
                expect_owner_epoch: vd.owner_epoch,
                owner_node_id: to,
            }))
            .await
            .map(|_| ())
            .map_err(meta_err)
    }

    /// Brings every group of every vdisk this node owns back to RF.
    /// Returns whether there was anything to do.
    async fn repair_owned(
        self: &Arc<Self>,
        cfg: &MonitorConfig,
        dead: &HashSet<u64>,
        members: &HashSet<u64>,
        st: &mut MonitorState,
    ) -> Result<bool, DataError> {
        let pass_start = cairn_util::now_unix_ms();
        let waits = Waits::read(&self.meta, cfg.rebuild_wait);
        let owned: Vec<_> = self
            .meta
            .all_vdisks()
            .map_err(meta_err)?
            .into_iter()
            .filter(|v| v.owner_node_id == self.node_id)
            .collect();
        if owned.is_empty() {
            return Ok(false);
        }
        // Groups that exist before the listings are taken: one allocated
        // after a node was listed is not missing from it, only newer.
        let mut known_before: HashSet<u64> = HashSet::new();
        for vd in &owned {
            for m in self.meta.mappings(&vd.id).map_err(meta_err)? {
                known_before.insert(m.extent_group_id);
            }
        }
        // What each live node actually holds (a wiped node holds nothing).
        let mut holdings: HashMap<u64, HashMap<u64, (bool, u64)>> = HashMap::new();
        for id in members.iter().filter(|id| !dead.contains(id)) {
            if let Some(list) = self.list_replicas(*id).await {
                holdings.insert(*id, list);
            }
        }
        let absent: Vec<u64> = members
            .iter()
            .copied()
            .filter(|n| !holdings.contains_key(n))
            .collect();
        let mut work: Vec<RepairWork> = Vec::new();
        // Groups short of replicas or losing one, and of those how many wait
        // for a node to come back.
        let mut short: HashSet<u64> = HashSet::new();
        let mut waiting = 0usize;
        let mut awaited: std::collections::BTreeSet<u64> = Default::default();
        let mut seen: HashMap<u64, u64> = HashMap::new();
        for vd in owned {
            let vol = self.local_volume(vd.clone())?;
            for m in self.meta.mappings(&vd.id).map_err(meta_err)? {
                let Some(g) = self
                    .meta
                    .extent_group(m.extent_group_id)
                    .map_err(meta_err)?
                else {
                    continue;
                };
                // A replica behind what its peers already had a pass ago
                // missed acknowledged writes (e.g. its file lost its tail).
                let behind = st.seen_max.get(&g.id).copied().unwrap_or(0);
                let why_lost = |n: u64| -> Option<String> {
                    if dead.contains(&n) {
                        return Some("node dead".into());
                    }
                    if !members.contains(&n) {
                        return Some("not a member".into());
                    }
                    match holdings.get(&n).map(|h| h.get(&g.id)) {
                        Some(None) if known_before.contains(&g.id) => {
                            Some("replica missing".into())
                        }
                        Some(Some((true, _))) => Some("replica damaged".into()),
                        Some(Some((_, seq))) if *seq < behind => Some(format!(
                            "replica behind: sequence {seq}, peers had {behind}"
                        )),
                        _ => None,
                    }
                };
                let mut lost = Vec::new();
                for n in g.replicas.iter().map(|r| r.node_id) {
                    if let Some(why) = why_lost(n) {
                        tracing::warn!(group = g.id, node = n, reason = %why, "replica lost");
                        lost.push(n);
                    }
                }
                let now_max = g
                    .replicas
                    .iter()
                    .filter_map(|r| holdings.get(&r.node_id).and_then(|h| h.get(&g.id)))
                    .map(|(_, seq)| *seq)
                    .max()
                    .unwrap_or(0);
                seen.insert(g.id, now_max);
                if !lost.is_empty() || (g.replicas.len() as u32) < vol.rf {
                    let mut stale: Vec<u64> = holdings
                        .iter()
                        .filter(|(n, h)| {
                            !g.replicas.iter().any(|r| r.node_id == **n)
                                && h.get(&g.id).is_some_and(|(damaged, _)| !damaged)
                        })
                        .map(|(n, _)| *n)
                        .collect();
                    // This node's own copy first (no network), then by id.
                    stale.sort_by_key(|n| (*n != self.node_id, *n));
                    short.insert(g.id);
                    if lost.is_empty() && stale.is_empty() {
                        if let Some(n) = self.awaits_node(g.id, &absent, &waits) {
                            waiting += 1;
                            awaited.insert(n);
                            continue;
                        }
                    }
                    work.push(RepairWork {
                        vol: vol.clone(),
                        g,
                        lost,
                        stale,
                    });
                }
            }
        }
        st.seen_max = seen;
        // Forget nodes awaited by groups that are whole again, or awaited
        // longer than the wait (a drop newer than the records read above is
        // kept: its group may not look short in them yet); in metadata too,
        // for the groups this node owns, and for groups that are gone.
        let keep = |(g, n): &(u64, u64), since: u64| {
            waits.holds(*n, since) && (short.contains(g) || since >= pass_start)
        };
        lock(&self.away).retain(|k, since| keep(k, *since));
        for (&(g, n), &since) in &waits.away {
            let forget = if known_before.contains(&g) {
                !keep(&(g, n), since)
            } else {
                matches!(self.meta.extent_group(g), Ok(None))
            };
            if forget {
                self.forget_away(g, n).await;
            }
        }
        self.report_waiting(cfg, st, waiting, &awaited, &waits)
            .await;
        if work.is_empty() {
            return Ok(false);
        }
        let per_group = u64::from(crate::DEFAULT_VBLOCK_SIZE);
        let mut task = TaskRecord {
            format_version: cairn_api::FORMAT_VERSION,
            id: format!("rebuild-{}-{}", self.node_id, cairn_util::now_unix_ms()),
            kind: "rebuild".into(),
            state: TaskState::TaskRunning as i32,
            node_id: self.node_id,
            description: format!("restore replication of {} extent group(s)", work.len()),
            total_bytes: per_group * work.len() as u64,
            done_bytes: 0,
            started_unix_ms: cairn_util::now_unix_ms(),
            updated_unix_ms: cairn_util::now_unix_ms(),
            message: String::new(),
        };
        tracing::warn!(task = %task.id, groups = work.len(), "re-replication started");
        self.put_task(&task).await;
        let mut last_put = Instant::now();
        let mut failures = 0;
        let mut tally = CopyTally::default();
        let mut last_err = String::new();
        for RepairWork {
            vol,
            g,
            lost,
            mut stale,
        } in work
        {
            let gs = self.load_group(g.id).await?;
            let t0 = Instant::now();
            let mut moved = 0u64;
            let res = async {
                if !lost.is_empty() {
                    vol.drop_replicas(&gs, &lost).await?;
                    tally.dropped += lost.len() as u64;
                }
                stale.retain(|n| !lost.contains(n) && !dead.contains(n));
                stale.reverse();
                while (gs.rec_snapshot().replicas.len() as u32) < vol.rf {
                    let holders = gs.rec_snapshot();
                    let stale_copy = loop {
                        match stale.pop() {
                            Some(n) if holders.replicas.iter().any(|r| r.node_id == n) => {}
                            other => break other,
                        }
                    };
                    let (target, has_copy) = match stale_copy {
                        Some(n) => (n, true),
                        // Just dropped a replica whose node is away: wait
                        // for it (a later pass) rather than rebuild now.
                        None if self.awaits_node(g.id, &absent, &waits).is_some() => break,
                        None => match self.pick_target(&holders, dead) {
                            Some(n) => (n, false),
                            None => {
                                return Err(DataError::Unavailable(
                                    "no node can take another replica".into(),
                                ))
                            }
                        },
                    };
                    let copy = match self.add_replica(&vol, &gs, target, has_copy).await {
                        Ok(c) => c,
                        // A copy that cannot be caught up (its disk full or
                        // failing, its node gone again) must not hold the
                        // group back pass after pass: the next candidate,
                        // or a whole copy, this pass.
                        Err(e) if has_copy => {
                            tracing::warn!(group = g.id, node = target, error = %e,
                                "catching up a returning replica failed; trying another way");
                            continue;
                        }
                        Err(e) => return Err(e),
                    };
                    moved += copy.bytes;
                    tally.add(&copy);
                }
                Ok::<(), DataError>(())
            }
            .await;
            if let Err(e) = res {
                failures += 1;
                last_err = format!("; {failures} failed, the last: extent group {}: {e}", g.id);
                tracing::warn!(group = g.id, error = %e, "re-replication of a group failed; will retry");
            }
            task.done_bytes += per_group;
            task.updated_unix_ms = cairn_util::now_unix_ms();
            task.message = format!("{tally}{last_err}");
            if last_put.elapsed() > Duration::from_millis(500) {
                self.put_task(&task).await;
                last_put = Instant::now();
            }
            // Throttle on what moved: leave the disks and network to
            // foreground I/O (a catch-up of a few blocks waits little).
            let budget = Duration::from_secs_f64(
                moved.max(BLOCK_SIZE as u64) as f64 / cfg.rebuild_bytes_per_sec.max(1) as f64,
            );
            if let Some(rest) = budget.checked_sub(t0.elapsed()) {
                tokio::time::sleep(rest).await;
            }
        }
        task.state = if failures == 0 {
            TaskState::TaskDone as i32
        } else {
            TaskState::TaskFailed as i32
        };
        task.updated_unix_ms = cairn_util::now_unix_ms();
        self.put_task(&task).await;
        tracing::warn!(task = %task.id, failures, dropped = tally.dropped, caught_up = tally.caught_up,
            caught_up_blocks = tally.caught_up_blocks, copied_whole = tally.whole,
            "re-replication pass finished");
        Ok(true)
    }

    pub(crate) async fn put_task(&self, t: &TaskRecord) {
        let r = self
            .meta
            .propose(Op::PutKv(PutKv {
                key: format!("{TASK_PREFIX}{}", t.id).into_bytes(),
                value: t.encode_to_vec(),
            }))
            .await;
        if let Err(e) = r {
            tracing::debug!(task = %t.id, error = %e, "cannot record task progress");
        }
    }

    /// group id -> (damaged, highest sequence), for every replica on
    /// `node`; None if unreachable.
    async fn list_replicas(&self, node: u64) -> Option<HashMap<u64, (bool, u64)>> {
        let list = match self.target(node).ok()? {
            Target::Local => self.pool().list(),
            Target::Remote(id, addr) => {
                let mut c = self.peers.client(id, &addr).ok()?;
                tokio::time::timeout(Duration::from_secs(5), c.list(ReplicaListRequest {}))
                    .await
                    .ok()?
                    .ok()?
                    .into_inner()
            }
        };
        Some(
            list.replicas
                .into_iter()
                .map(|r| (r.extent_group_id, (r.damaged, r.max_sequence)))
                .collect(),
        )
    }

    /// A live node without a replica of the group and with room; this node first.
    fn pick_target(&self, g: &ExtentGroupRecord, dead: &HashSet<u64>) -> Option<u64> {
        let holders: HashSet<u64> = g.replicas.iter().map(|r| r.node_id).collect();
        if !holders.contains(&self.node_id) && self.pool().has_room() {
            return Some(self.node_id);
        }
        let disks = self.meta.disks().ok()?;
        // Outside maintenance first (see `DataService::place`), then room.
        let marked = crate::drain::current_marks(&self.meta);
        let mut best: Option<(bool, u64, u64)> = None;
        for n in self.meta.nodes().ok()? {
            if holders.contains(&n.id) || dead.contains(&n.id) || !self.peers.is_up(n.id) {
                continue;
            }
            let free: u64 = disks
                .iter()
                .filter(|d| d.node_id == n.id && d.health <= 1)
                .map(|d| d.capacity_bytes.saturating_sub(d.used_bytes))
                .sum();
            let key = (!marked.contains_key(&n.id), free, n.id);
            if best.is_none_or(|b| (key.0, key.1) > (b.0, b.1)) {
                best = Some(key);
            }
        }
        best.map(|(_, _, id)| id)
    }

    /// Brings `target` to a current copy of the group and adds it to the
    /// replica set: by copying only the blocks it lacks when it still holds
    /// a copy (`has_copy`, see [`crate::catchup`]), else the whole group.
    /// Writes to the group wait meanwhile (one group at a time, so briefly).
    async fn add_replica(
        &self,
        vol: &Volume,
        gs: &Arc<GroupState>,
        target: u64,
        has_copy: bool,
    ) -> Result<Copied, DataError> {
        let _gate = gs.gate.write().await;
        let _c = gs.change.lock().await;
        let rec = gs.rec_snapshot();
        let blocks = group_block_count(&rec);
        // Healthy sources: the local replica first if we have one.
        let mut sources: Vec<u64> = rec.replicas.iter().map(|r| r.node_id).collect();
        sources.sort_by_key(|n| *n != self.node_id);
        let mut header = vol.header_for(&rec);
        header.epoch = rec.epoch;
        let write =
            |kind: RecordKind, seq: u64, first: u32, count: u32, data: Vec<u8>, create: bool| {
                ReplicaWrite {
                    format_version: cairn_api::FORMAT_VERSION,
                    extent_group_id: gs.id,
                    epoch: rec.epoch,
                    sequence: seq,
                    kind: kind as i32,
                    first_block: first,
                    block_count: count,
                    block_crc32c: if data.is_empty() {
                        Vec::new()
                    } else {
                        format::block_checksums(&data)
                    },
                    data: data.into(),
                    create: create.then(|| header.clone()),
                    copy: true,
                    deferred_sync: false,
                }
            };
        let caught_up = if has_copy {
            self.catch_up(gs.id, blocks, &sources, target, &write)
                .await?
        } else {
            None
        };
        let copied = match caught_up {
            Some(c) => c,
            None => {
                self.copy_whole(gs.id, blocks, &sources, target, &write)
                    .await?
            }
        };
        let mut replicas = rec.replicas.clone();
        replicas.push(ReplicaLocation {
            node_id: target,
            disk_id: String::new(),
        });
        let new = self
            .propose_replica_set(gs, &rec, replicas)
            .await?
            .map_err(|why| DataError::Unavailable(format!("adding a replica: {why}")))?;
        self.raise_replica_epochs(&new).await;
        tracing::info!(
            group = gs.id,
            node = target,
            replicas = new.replicas.len(),
            caught_up = copied.caught_up,
            blocks = copied.bytes / BLOCK_SIZE as u64,
            "extent group re-replicated"
        );
        Ok(copied)
    }

    /// Reads the group's `blocks` (or only their states) from the first of
    /// `sources` that answers; returns that node and its reply.
    async fn read_any(
        &self,
        sources: &[u64],
        group: u64,
        blocks: u32,
        states_only: bool,
    ) -> Result<(u64, ReplicaReadReply), DataError> {
        for n in sources {
            if let Ok(r) = self.replica_read(*n, group, 0, blocks, states_only).await {
                return Ok((*n, r));
            }
        }
        Err(DataError::Unavailable(format!(
            "extent group {group}: no readable replica"
        )))
    }

    /// Copies every mapped block of the group from the first readable
    /// source to `target`, whose copy (if any) is deleted first.
    async fn copy_whole(
        &self,
        group: u64,
        blocks: u32,
        sources: &[u64],
        target: u64,
        write: &CopyWrite<'_>,
    ) -> Result<Copied, DataError> {
        let (_, src) = self.read_any(sources, group, blocks, false).await?;
        // Start clean: a stale copy on the target could resurrect old blocks.
        self.replica_delete(target, group).await?;
        self.replica_write(
            target,
            write(RecordKind::RecordEpoch, 0, 0, 0, Vec::new(), true),
        )
        .await?;
        let mut bytes = 0u64;
        let mut b = 0usize;
        let n = src.blocks.len();
        while b < n {
            let st = src.blocks[b];
            if !st.mapped {
                b += 1;
                continue;
            }
            let start = b;
            while b < n
                && src.blocks[b].mapped
                && src.blocks[b].sequence == st.sequence
                && b - start < 256
            {
                b += 1;
            }
            let data = src.data[start * BLOCK_SIZE..b * BLOCK_SIZE].to_vec();
            bytes += data.len() as u64;
            self.replica_write(
                target,
                write(
                    RecordKind::RecordData,
                    st.sequence,
                    start as u32,
                    (b - start) as u32,
                    data,
                    false,
                ),
            )
            .await?;
        }
        Ok(Copied {
            caught_up: false,
            bytes,
        })
    }

    /// Copies to `target`, which holds a stale copy of the group, only the
    /// blocks whose version differs from a current replica's. `None` when
    /// that cannot make it current (it holds versions no current replica
    /// supersedes, its copy is unreadable or gone, or a node predates
    /// block versions): the caller copies the group whole.
    async fn catch_up(
        &self,
        group: u64,
        blocks: u32,
        sources: &[u64],
        target: u64,
        write: &CopyWrite<'_>,
    ) -> Result<Option<Copied>, DataError> {
        // Fence first: from this record on the target refuses the epochs of
        // every earlier primary, and the record's durable write syncs what
        // the copy already held, which the comparison below trusts.
        self.replica_write(
            target,
            write(RecordKind::RecordEpoch, 0, 0, 0, Vec::new(), true),
        )
        .await?;
        let theirs = match self.replica_read(target, group, 0, blocks, true).await {
            Ok(r) if r.versions => r,
            Ok(_) => return Ok(None),
            Err(e) => {
                tracing::info!(group, node = target, error = %e,
                    "the stale copy cannot be read; copying the group whole");
                return Ok(None);
            }
        };
        let (from, ours) = self.read_any(sources, group, blocks, true).await?;
        if !ours.versions {
            return Ok(None);
        }
        let Some(runs) = catchup::catch_up_plan(&ours.blocks, &theirs.blocks) else {
            tracing::info!(
                group,
                node = target,
                "the stale copy holds writes no current replica has; copying the group whole"
            );
            return Ok(None);
        };
        // Many scattered runs (random writes missed): one read of the span
        // they cover costs less than a read each.
        let data_runs: Vec<&catchup::CopyRun> = runs.iter().filter(|r| !r.trim).collect();
        let span = match (data_runs.first(), data_runs.last()) {
            (Some(a), Some(z)) if data_runs.len() > SPAN_READ_AFTER => {
                let (first, end) = (a.first_block, z.first_block + z.block_count);
                let got = self
                    .replica_read(from, group, first, end - first, false)
                    .await?;
                Some((first, got))
            }
            _ => None,
        };
        let mut records = Vec::with_capacity(runs.len());
        let mut bytes = 0u64;
        for r in &runs {
            if r.trim {
                records.push(write(
                    RecordKind::RecordTrim,
                    r.sequence,
                    r.first_block,
                    r.block_count,
                    Vec::new(),
                    false,
                ));
                continue;
            }
            let (states, data) = match &span {
                Some((first, got)) => {
                    let at = (r.first_block - first) as usize;
                    let n = r.block_count as usize;
                    let data = got
                        .data
                        .get(at * BLOCK_SIZE..(at + n) * BLOCK_SIZE)
                        .map(<[u8]>::to_vec);
                    (got.blocks.get(at..at + n).map(<[_]>::to_vec), data)
                }
                None => {
                    let got = self
                        .replica_read(from, group, r.first_block, r.block_count, false)
                        .await?;
                    (Some(got.blocks), Some(got.data))
                }
            };
            // The group's writes wait on its gate, so the source cannot have
            // moved on; if it did anyway, the copy would be wrong: fail.
            let (Some(states), Some(data)) = (states, data) else {
                return Err(DataError::Unavailable(format!(
                    "extent group {group}: short read from node {from} during a catch-up"
                )));
            };
            if states.len() != r.block_count as usize
                || data.len() != r.block_count as usize * BLOCK_SIZE
                || states.iter().any(|b| !b.mapped || b.sequence != r.sequence)
            {
                return Err(DataError::Unavailable(format!(
                    "extent group {group}: the source changed during a catch-up"
                )));
            }
            bytes += data.len() as u64;
            records.push(write(
                RecordKind::RecordData,
                r.sequence,
                r.first_block,
                r.block_count,
                data,
                false,
            ));
        }
        // The runs never overlap and the target keeps the highest sequence
        // per block whatever the order, so they may arrive in any order:
        // several in flight at once (each waits for its sync, and waiting
        // writes share one).
        let mut sent = futures::stream::iter(records)
            .map(|w| self.replica_write(target, w))
            .buffer_unordered(COPIES_IN_FLIGHT);
        while let Some(r) = sent.next().await {
            r?;
        }
        Ok(Some(Copied {
            caught_up: true,
            bytes,
        }))
    }

    /// Verifies a slice of this node's owned groups on every replica.
    async fn scrub_some(
        self: &Arc<Self>,
        cfg: &MonitorConfig,
        st: &mut MonitorState,
    ) -> Result<(), DataError> {
        let per_group = u64::from(crate::DEFAULT_VBLOCK_SIZE);
        let budget = (cfg.scrub_bytes_per_sec * cfg.interval.as_secs().max(1)).max(per_group);
        let groups: Vec<ExtentGroupRecord> = self
            .meta
            .extent_groups()
            .map_err(meta_err)?
            .into_iter()
            .filter(|g| {
                self.meta
                    .vdisk_by_id(&g.vdisk_id)
                    .ok()
                    .flatten()
                    .is_some_and(|v| v.owner_node_id == self.node_id)
            })
            .collect();
        if groups.is_empty() {
            return Ok(());
        }
        let count = (budget / per_group).max(1) as usize;
        for k in 0..count.min(groups.len()) {
            let g = &groups[(st.scrub_cursor + k) % groups.len()];
            let blocks = group_block_count(g);
            for r in &g.replicas {
                match self.replica_read(r.node_id, g.id, 0, blocks, false).await {
                    Ok(_) => {}
                    Err(e) if e.is_replica_fault() || matches!(e, DataError::NotFound(_)) => {
                        tracing::warn!(group = g.id, node = r.node_id, error = %e,
                            "scrub found a bad replica");
                        self.stats.checksum_repairs.fetch_add(1, Ordering::Relaxed);
                        if r.node_id == self.node_id {
                            // Reading through the volume path rewrites the bad blocks.
                            if let Some(vd) =
                                self.meta.vdisk_by_id(&g.vdisk_id).map_err(meta_err)?
                            {
                                let vol = self.local_volume(vd)?;
                                let gs = self.load_group(g.id).await?;
                                vol.scrub_repair(&gs, blocks).await?;
                            }
                        } else if let Some(vd) =
                            self.meta.vdisk_by_id(&g.vdisk_id).map_err(meta_err)?
                        {
                            let vol = self.local_volume(vd)?;
                            let gs = self.load_group(g.id).await?;
                            vol.drop_replicas(&gs, &[r.node_id]).await?;
                        }
                    }
                    Err(_) => {}
                }
            }
        }
        st.scrub_cursor = (st.scrub_cursor + count) % groups.len().max(1);
        Ok(())
    }

    /// The node `group` waits for: one of its replicas was dropped, within
    /// the last `wait`, while that node could not be reached, and it is not
    /// back (among `absent`: the members whose listing this pass did not
    /// get).
    fn awaits_node(&self, group: u64, absent: &[u64], waits: &Waits) -> Option<u64> {
        let away = lock(&self.away);
        absent.iter().copied().find(|n| {
            away.get(&(group, *n))
                .or_else(|| waits.away.get(&(group, *n)))
                .is_some_and(|since| waits.holds(*n, *since))
        })
    }

    /// Shows groups waiting for their nodes as a task (`rebuild-wait`,
    /// running while any wait, done once none does) and a log line, each
    /// time their number changes.
    async fn report_waiting(
        &self,
        cfg: &MonitorConfig,
        st: &mut MonitorState,
        waiting: usize,
        nodes: &std::collections::BTreeSet<u64>,
        waits: &Waits,
    ) {
        let stale = st
            .wait_put_at
            .is_none_or(|t| t.elapsed() >= WAIT_TASK_REFRESH);
        let changed = waiting != st.waiting_logged;
        let refresh = waiting > 0 && stale;
        if !(changed || refresh) {
            return;
        }
        st.waiting_logged = waiting;
        st.wait_put_at = Some(Instant::now());
        let now = cairn_util::now_unix_ms();
        if waiting == 0 {
            if let Some(mut t) = st.wait_task.take() {
                t.state = TaskState::TaskDone as i32;
                t.done_bytes = t.total_bytes;
                t.updated_unix_ms = now;
                t.message = "no group waits any more: their nodes came back and were \
                             caught up, or the wait ran out and they were rebuilt elsewhere \
                             (see the rebuild tasks)"
                    .into();
                self.put_task(&t).await;
            }
            return;
        }
        if changed {
            tracing::warn!(
                groups = waiting,
                nodes = ?nodes,
                wait_secs = cfg.rebuild_wait.as_secs(),
                "extent groups run with a replica fewer while they wait for its node \
                 to come back and catch up; rebuilt elsewhere once the wait is over"
            );
        }
        let t = st.wait_task.get_or_insert_with(|| TaskRecord {
            format_version: cairn_api::FORMAT_VERSION,
            id: format!("rebuild-wait-{}-{now}", self.node_id),
            kind: "rebuild-wait".into(),
            state: TaskState::TaskRunning as i32,
            node_id: self.node_id,
            started_unix_ms: now,
            ..Default::default()
        });
        t.description = format!(
            "{waiting} extent group(s) run with a replica fewer, waiting for node(s) {nodes:?} \
             to come back"
        );
        let mut message = format!(
            "each is rebuilt on another node once it has waited {} s",
            cfg.rebuild_wait.as_secs()
        );
        let in_maintenance: Vec<String> = nodes
            .iter()
            .filter_map(|n| waits.maintenance.get(n).map(|until| (n, until)))
            .map(|(n, until)| {
                let left = until.saturating_sub(now) / 1000;
                format!("node {n} for {left} s more")
            })
            .collect();
        if !in_maintenance.is_empty() {
            message.push_str(&format!(
                ", or once its node's maintenance ends: {}",
                in_maintenance.join(", ")
            ));
        }
        t.message = message;
        t.total_bytes = waiting as u64 * u64::from(crate::DEFAULT_VBLOCK_SIZE);
        t.updated_unix_ms = now;
        let t = t.clone();
        self.put_task(&t).await;
    }

    /// Closes the rebuild and rebuild-wait tasks this node's previous run
    /// left running (it stopped or crashed during them): a fresh monitor
    /// has none of its own yet, and they would otherwise show as running
    /// for ever. Returns false when metadata could not be read up to date
    /// (tried again before the next pass).
    async fn sweep_stale_tasks(&self) -> bool {
        if self.meta.read_barrier().await.is_err() {
            return false;
        }
        let Ok(tasks) = self.meta.tasks() else {
            return false;
        };
        let now = cairn_util::now_unix_ms();
        for mut t in tasks {
            if t.node_id != self.node_id || t.state != TaskState::TaskRunning as i32 {
                continue;
            }
            match t.kind.as_str() {
                "rebuild" => {
                    t.state = TaskState::TaskFailed as i32;
                    t.message = format!(
                        "interrupted by a restart of node {}; the data monitor goes on with \
                         what is left (see the newer rebuild tasks). {}",
                        self.node_id, t.message
                    );
                }
                "rebuild-wait" => {
                    t.state = TaskState::TaskDone as i32;
                    t.done_bytes = t.total_bytes;
                    t.message = format!(
                        "node {} restarted: a newer rebuild-wait task shows the groups that \
                         still wait",
                        self.node_id
                    );
                }
                _ => continue,
            }
            t.updated_unix_ms = now;
            tracing::info!(task = %t.id, kind = %t.kind, "closed a task left running by the previous run");
            self.put_task(&t).await;
        }
        true
    }

    /// The group has fewer replicas than its datastore's RF.
    fn short_of_replicas(&self, g: &ExtentGroupRecord) -> bool {
        let Ok(Some(vd)) = self.meta.vdisk_by_id(&g.vdisk_id) else {
            return false;
        };
        let Ok(stores) = self.meta.datastores() else {
            return false;
        };
        stores
            .iter()
            .find(|d| d.id == vd.datastore_id)
            .is_some_and(|d| (g.replicas.len() as u32) < d.replication_factor.clamp(1, 3))
    }

    /// Deletes local replicas that metadata no longer lists for this node.
    async fn collect_garbage(&self, st: &mut MonitorState) -> Result<(), DataError> {
        let now = Instant::now();
        // Deleting on a stale view of metadata (a lagging or cut-off node)
        // could drop a replica that was just added: decide only on a view
        // confirmed current by a ReadIndex round.
        if st.orphans.values().any(|t| now - *t > ORPHAN_GRACE) {
            self.meta.read_barrier().await.map_err(meta_err)?;
        }
        let mut seen = HashSet::new();
        for d in self.pool().disks() {
            for id in d.group_ids() {
                seen.insert(id);
                let rec = self.meta.extent_group(id).map_err(meta_err)?;
                let referenced = rec
                    .as_ref()
                    .is_some_and(|g| g.replicas.iter().any(|r| r.node_id == self.node_id));
                // A copy of a group still short of replicas is what its
                // owner will catch up (only the missed writes) rather than
                // copy whole to some node: kept until the group is whole.
                let wanted = rec.as_ref().is_some_and(|g| self.short_of_replicas(g));
                if referenced
                    || wanted
                    || lock(&self.groups).get(&id).is_some_and(|g| {
                        g.rec_snapshot()
                            .replicas
                            .iter()
                            .any(|r| r.node_id == self.node_id)
                    })
                {
                    st.orphans.remove(&id);
                    continue;
                }
                let first = *st.orphans.entry(id).or_insert(now);
                if now - first > ORPHAN_GRACE {
                    st.orphans.remove(&id);
                    match d.delete_group(id) {
                        Ok(()) => tracing::info!(
                            group = id,
                            disk = d.id(),
                            "deleted an extent group replica no longer in its replica set"
                        ),
                        Err(e) => {
                            tracing::warn!(group = id, error = %e, "cannot delete an orphan replica")
                        }
                    }
                }
            }
        }
        st.orphans.retain(|id, _| seen.contains(id));
        Ok(())
    }
}
