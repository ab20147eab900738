//! The raft-rs driver: one task owns the `RawNode`, its RocksDB log and the
//! state machine. It receives peer messages and client requests on one
//! channel, drains everything queued before handling a Ready, so concurrent
//! proposals share one fsync (group commit) and concurrent linearizable reads
//! share one ReadIndex round.
//!
//! It is a task on the node's runtime, not a thread of its own: a message
//! that arrives on a runtime worker is then stepped on that same worker, and
//! what raft sends back leaves from it too, instead of waking another thread
//! at every hop. On a small VM those wakeups were most of the cost of a
//! ReadIndex round (the leader used to spend ~12 context switches per read,
//! half of them handing work between its runtime and the raft thread).
//! Disk work that can take long (snapshot installs, log compaction, the
//! final flush) goes to the blocking pool ([`Driver::write_off_worker`]) and
//! the driver awaits it. The fsync of new entries runs in place, on the
//! worker: a leader first yields so the tasks that send this Ready's appends
//! run (its appends leave before its own fsync), a follower has nothing to
//! send first. See `on_ready`.
//!
//! Invariants enforced here:
//! - Log entries and hard state are fsynced before the messages that depend
//!   on them (votes, append acks) are sent (`persisted_messages`).
//! - The applied index is written in the same RocksDB batch as the state the
//!   entries produced, so a crash never applies an entry twice or skips one.
//!   That batch skips the WAL (a crash loses it and the entries are applied
//!   again from the log), so the log is compacted only after a flush, and at
//!   start the commit index is raised to the applied index found on disk.
//! - A linearizable read is answered only after a ReadIndex round confirmed
//!   leadership and this node applied up to that index.
//! - The log is only compacted below the applied index.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_api::metadata::v1::{Command, CommandResult, ConfChangeContext, NodeRecord, NodeRole};
use cairn_util::error_code::codes;
use prost::Message as _;
use protobuf::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeType, ConfState, Entry, EntryType, Message as RaftMessage,
};
use raft::{RawNode, SnapshotStatus, StateRole};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::oneshot;

use crate::engine::{Batch, Engine, StateCf, CF_STATE};
use crate::handle::NodeStatus;
use crate::log::{encode_pair, RaftLog};
use crate::state::{self, Layered, Overlay, KEY_APPLIED, KEY_CONF_STATE, PREFIX_NODE};
use crate::transport::Transport;
use crate::MetaError;

/// Silence from a member after which its outbound link is renewed.
const SILENT_LINK: Duration = Duration::from_secs(3);

/// How often received snapshot files raft can no longer use are removed.
const SNAPSHOT_SWEEP: Duration = Duration::from_secs(10);

/// Tunables of the raft loop.
#[derive(Debug, Clone)]
pub struct RaftSettings {
    pub tick: Duration,
    pub election_tick: usize,
    pub heartbeat_tick: usize,
    /// Compact the log once it holds this many applied entries...
    pub compact_threshold: u64,
    /// ...keeping this many behind the applied index for slow followers.
    pub compact_retain: u64,
}

impl Default for RaftSettings {
    fn default() -> Self {
        Self {
            tick: Duration::from_millis(100),
            election_tick: 10,
            heartbeat_tick: 2,
            compact_threshold: 8_000,
            compact_retain: 2_000,
        }
    }
}

pub(crate) type Reply<T> = oneshot::Sender<Result<T, MetaError>>;

/// Everything the driver is asked to do.
pub(crate) enum Msg {
    Raft(Box<RaftMessage>),
    Propose {
        cmd: Command,
        reply: Reply<CommandResult>,
    },
    ConfChange {
        cc: ConfChange,
        request_id: u64,
        reply: Reply<CommandResult>,
    },
    ReadIndex {
        reply: Reply<u64>,
    },
    Status {
        reply: oneshot::Sender<NodeStatus>,
    },
    Unreachable(u64),
    /// Hand leadership to this voter, if this node leads.
    TransferLeader(u64),
    SnapshotDone {
        to: u64,
        ok: bool,
    },
    Shutdown,
}

pub(crate) struct Driver {
    id: u64,
    raw: RawNode<RaftLog>,
    engine: Arc<Engine>,
    inbox: UnboundedReceiver<Msg>,
    transport: Arc<Transport>,
    settings: RaftSettings,
    proposals: HashMap<u64, Reply<CommandResult>>,
    read_queue: Vec<Reply<u64>>,
    /// Keyed by ReadIndex context: node id + counter, unique cluster-wide,
    /// because raft-rs silently drops a request whose context is already
    /// pending at the leader (another node's identical counter would collide).
    reads_inflight: HashMap<Vec<u8>, Vec<Reply<u64>>>,
    reads_waiting: Vec<(u64, Reply<u64>)>,
    next_read_ctx: u64,
    applied: u64,
    applied_term: u64,
    conf_state: ConfState,
    last_leader: u64,
    /// When each peer's last raft message arrived, and when its link was
    /// last renewed for silence (see [`Transport::reconnect`]).
    last_heard: HashMap<u64, Instant>,
    last_renewed: HashMap<u64, Instant>,
}

impl Driver {
    // Everything the driver owns comes from `MetadataHandle::start`; a builder
    // would only move the same list elsewhere.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        id: u64,
        raw: RawNode<RaftLog>,
        engine: Arc<Engine>,
        inbox: UnboundedReceiver<Msg>,
        transport: Arc<Transport>,
        settings: RaftSettings,
        applied: (u64, u64),
        conf_state: ConfState,
    ) -> Self {
        Self {
            id,
            raw,
            engine,
            inbox,
            transport,
            settings,
            proposals: HashMap::new(),
            read_queue: Vec::new(),
            reads_inflight: HashMap::new(),
            reads_waiting: Vec::new(),
            next_read_ctx: 1,
            applied: applied.0,
            applied_term: applied.1,
            conf_state,
            last_leader: raft::INVALID_ID,
            last_heard: HashMap::new(),
            last_renewed: HashMap::new(),
        }
    }

    /// Runs until shutdown. An engine error ends the loop with `Err`: the
    /// node must stop rather than serve metadata it could not persist.
    pub(crate) async fn run(mut self) -> Result<(), MetaError> {
        self.refresh_peers()?;
        let mut next_tick = Instant::now() + self.settings.tick;
        let mut next_sweep = Instant::now() + Duration::from_secs(1);
        let mut next_snap_sweep = Instant::now() + SNAPSHOT_SWEEP;
        loop {
            let deadline = tokio::time::Instant::from_std(next_tick);
            match tokio::time::timeout_at(deadline, self.inbox.recv()).await {
                Ok(Some(msg)) => {
                    if !self.handle(msg) {
                        break;
                    }
                    for _ in 0..4096 {
                        match self.inbox.try_recv() {
                            Ok(msg) => {
                                if !self.handle(msg) {
                                    return self.shutdown().await;
                                }
                            }
                            Err(_) => break,
                        }
                    }
                }
                Ok(None) => break,
                Err(_elapsed) => {}
            }
            let now = Instant::now();
            if now >= next_tick {
                self.raw.tick();
                next_tick = now + self.settings.tick;
                self.renew_silent_links(now);
            }
            if now >= next_sweep {
                self.sweep_abandoned();
                next_sweep = now + Duration::from_secs(1);
            }
            if now >= next_snap_sweep {
                self.sweep_received_snapshots();
                next_snap_sweep = now + SNAPSHOT_SWEEP;
            }
            self.start_reads();
            self.on_ready().await?;
        }
        self.shutdown().await
    }

    /// Asks the transport for a new connection to each member this node
    /// has not heard from for [`SILENT_LINK`] (at most once per that long
    /// per peer). A link only renews when something is sent on it, so a
    /// follower's idle links to other followers are left alone.
    fn renew_silent_links(&mut self, now: Instant) {
        let members = self
            .conf_state
            .voters
            .iter()
            .chain(&self.conf_state.learners)
            .copied()
            .filter(|id| *id != self.id);
        for id in members {
            let heard = *self.last_heard.entry(id).or_insert(now);
            let renewed = self.last_renewed.get(&id).copied();
            if now - heard > SILENT_LINK && renewed.is_none_or(|t| now - t > SILENT_LINK) {
                self.transport.reconnect(id);
                self.last_renewed.insert(id, now);
            }
        }
    }

    /// Removes received snapshot files raft can no longer install: their
    /// index is below what this node has applied (raft refuses a snapshot
    /// at or below its commit index). A snapshot raft turned down when it
    /// arrived (stale by then) used to stay, as large as the whole state,
    /// until the next install or start. The one being installed is never
    /// below the applied index: installs run on this task, and `applied`
    /// moves to a snapshot's index only once it is in.
    fn sweep_received_snapshots(&self) {
        let dir = self.raw.store().snap_dir().clone();
        let below = self.applied;
        // Unlinking a file of gigabytes takes a while: not on this worker.
        tokio::task::spawn_blocking(move || dir.remove_received_below(below));
    }

    async fn shutdown(self) -> Result<(), MetaError> {
        tracing::info!(
            node = self.id,
            "metadata service stopping; flushing RocksDB"
        );
        let engine = self.engine.clone();
        off_worker(move || engine.flush()).await
    }

    /// Commits `batch` on the blocking pool: an fsync (or a large batch)
    /// takes milliseconds that the runtime worker spends on other tasks.
    async fn write_off_worker(&self, batch: Batch<'_>, sync: bool) -> Result<(), MetaError> {
        let wb = batch.into_write_batch();
        if wb.is_empty() {
            return Ok(());
        }
        let engine = self.engine.clone();
        off_worker(move || engine.write(wb, sync)).await
    }

    /// Replaces log and state with a snapshot raft-rs accepted; returns the
    /// number of entries installed. One that came as a file is read whole
    /// into an SST first, then installed in two steps: the log half with a
    /// note, synced; then the state in one ingestion. A crash between them
    /// is finished at start (`log::finish_interrupted_install`).
    async fn install_snapshot(&mut self, snap: &raft::eraftpb::Snapshot) -> Result<u64, MetaError> {
        let data = crate::log::decode_snapshot(snap)?;
        let mut batch = self.engine.batch();
        if data.file.is_none() {
            self.raw.mut_store().install_snapshot(snap, &mut batch)?;
            self.write_off_worker(batch, true).await?;
            self.engine.bump_catalog_era();
            return Ok(data.entries.len() as u64);
        }
        // The whole file is read and checked first, while nothing has
        // changed: a damaged one stops the node with its raft state as it
        // was, and the leader sends a snapshot again after the restart.
        let meta = snap.get_metadata();
        let (index, term) = (meta.index, meta.term);
        let conf_state = meta.get_conf_state().clone();
        let engine = self.engine.clone();
        let dir = self.raw.store().snap_dir().clone();
        let prepared = off_worker(move || {
            crate::snapfile::prepare_state(&engine, &dir, index, term, &conf_state)
        })
        .await
        .inspect_err(|e| {
            tracing::error!(index, error = %e, "a received metadata snapshot cannot be installed");
        })?;
        self.raw
            .mut_store()
            .install_snapshot_log(snap, &mut batch)?;
        RaftLog::mark_installing(snap, &mut batch)?;
        self.write_off_worker(batch, true).await?;
        let engine = self.engine.clone();
        let dir = self.raw.store().snap_dir().clone();
        let keys = off_worker(move || {
            let keys = crate::snapfile::install_prepared(&engine, prepared)?;
            engine.bump_catalog_era();
            let mut batch = engine.batch();
            RaftLog::clear_installing(&mut batch)?;
            batch.commit(false)?;
            // A newer file may have arrived meanwhile: it stays.
            dir.remove_received_below(index + 1);
            Ok(keys)
        })
        .await?;
        Ok(keys)
    }

    fn handle(&mut self, msg: Msg) -> bool {
        match msg {
            Msg::Raft(m) => {
                self.last_heard.insert(m.from, Instant::now());
                if let Err(e) = self.raw.step(*m) {
                    tracing::debug!(node = self.id, error = %e, "raft step ignored a message");
                }
            }
            Msg::Propose { cmd, reply } => {
                if self.raw.raft.leader_id == raft::INVALID_ID {
                    let _ = reply.send(Err(MetaError::NoLeader));
                    return true;
                }
                let rid = cmd.request_id;
                match self.raw.propose(vec![], cmd.encode_to_vec()) {
                    Ok(()) => {
                        self.proposals.insert(rid, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.into()));
                    }
                }
            }
            Msg::ConfChange {
                cc,
                request_id,
                reply,
            } => {
                if self.raw.raft.leader_id == raft::INVALID_ID {
                    let _ = reply.send(Err(MetaError::NoLeader));
                    return true;
                }
                match self.raw.propose_conf_change(vec![], cc) {
                    Ok(()) => {
                        self.proposals.insert(request_id, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.into()));
                    }
                }
            }
            Msg::ReadIndex { reply } => self.read_queue.push(reply),
            Msg::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Msg::Unreachable(id) => self.raw.report_unreachable(id),
            Msg::TransferLeader(to) => {
                if self.raw.raft.state == StateRole::Leader && to != self.id {
                    tracing::info!(
                        node = self.id,
                        to,
                        term = self.raw.raft.term,
                        "handing raft leadership over"
                    );
                    self.raw.transfer_leader(to);
                }
            }
            Msg::SnapshotDone { to, ok } => {
                let status = if ok {
                    SnapshotStatus::Finish
                } else {
                    SnapshotStatus::Failure
                };
                self.raw.report_snapshot(to, status);
            }
            Msg::Shutdown => return false,
        }
        true
    }

    fn status(&self) -> NodeStatus {
        let raft = &self.raw.raft;
        let role = match raft.state {
            StateRole::Leader => "leader",
            StateRole::Follower => "follower",
            StateRole::Candidate => "candidate",
            StateRole::PreCandidate => "pre-candidate",
        };
        let progress = if raft.state == StateRole::Leader {
            let mut p: Vec<(u64, u64)> = raft
                .prs()
                .iter()
                .map(|(id, pr)| (*id, pr.matched))
                .collect();
            p.sort_unstable();
            p
        } else {
            Vec::new()
        };
        let mut voters = self.conf_state.voters.clone();
        voters.sort_unstable();
        let mut learners = self.conf_state.learners.clone();
        learners.sort_unstable();
        NodeStatus {
            node_id: self.id,
            role: role.to_string(),
            leader_id: raft.leader_id,
            term: raft.term,
            commit_index: raft.raft_log.committed,
            applied_index: self.applied,
            first_index: self.raw.store().truncated_index() + 1,
            last_index: self.raw.store().last_index_now(),
            voters,
            learners,
            progress,
        }
    }

    /// Drops waiters whose caller gave up (timed out), so maps do not grow.
    fn sweep_abandoned(&mut self) {
        self.proposals.retain(|_, r| !r.is_closed());
        self.reads_inflight.retain(|_, rs| {
            rs.retain(|r| !r.is_closed());
            !rs.is_empty()
        });
        self.reads_waiting.retain(|(_, r)| !r.is_closed());
    }

    /// One ReadIndex round for every read queued since the last one.
    fn start_reads(&mut self) {
        if self.read_queue.is_empty() {
            return;
        }
        let waiters = std::mem::take(&mut self.read_queue);
        if self.raw.raft.leader_id == raft::INVALID_ID {
            for w in waiters {
                let _ = w.send(Err(MetaError::NoLeader));
            }
            return;
        }
        let ctx = [self.id.to_be_bytes(), self.next_read_ctx.to_be_bytes()].concat();
        self.next_read_ctx += 1;
        self.raw.read_index(ctx.clone());
        self.reads_inflight.insert(ctx, waiters);
    }

    fn release_reads(&mut self) {
        let applied = self.applied;
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.reads_waiting)
            .into_iter()
            .partition(|(idx, _)| *idx <= applied);
        self.reads_waiting = waiting;
        for (idx, w) in ready {
            let _ = w.send(Ok(idx));
        }
    }

    async fn on_ready(&mut self) -> Result<(), MetaError> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut ready = self.raw.ready();
        if let Some(ss) = ready.ss() {
            if ss.leader_id != self.last_leader {
                self.last_leader = ss.leader_id;
                // ReadIndex requests sent to the old leader are lost with it:
                // ask again (reads are idempotent; proposals are not retried).
                for (_, waiters) in self.reads_inflight.drain() {
                    self.read_queue.extend(waiters);
                }
            }
        }
        // A leader may send appends before its own disk write (raft thesis 10.2.1).
        self.transport.send(ready.take_messages());

        if !ready.snapshot().is_empty() {
            let snap = ready.snapshot().clone();
            let keys = self.install_snapshot(&snap).await?;
            let meta = snap.get_metadata();
            self.applied = meta.index;
            self.applied_term = meta.term;
            self.conf_state = meta.get_conf_state().clone();
            tracing::info!(
                node = self.id,
                index = meta.index,
                term = meta.term,
                keys,
                "installed metadata snapshot from the leader"
            );
            self.refresh_peers()?;
        }

        self.apply_entries(ready.take_committed_entries())?;

        // Entries, term and vote must be on disk before anyone hears of them;
        // a commit-index-only change need not be (it is recomputed from a
        // quorum after a crash), so it rides along without its own fsync.
        let must_sync = ready.must_sync();
        // Heartbeats and ReadIndex rounds carry nothing to persist: skip the
        // empty RocksDB write that would otherwise sit in every round trip.
        // A hard state that only moved its commit index to what the apply
        // batch above already stored (`set_commit`) is not written twice.
        let hs = ready
            .hs()
            .filter(|hs| *hs != self.raw.store().hard_state())
            .cloned();
        if !ready.entries().is_empty() || hs.is_some() {
            let mut batch = self.engine.batch();
            self.raw.mut_store().append(ready.entries(), &mut batch)?;
            if let Some(hs) = &hs {
                self.raw.mut_store().set_hard_state(hs, &mut batch)?;
            }
            if must_sync && self.raw.raft.state == StateRole::Leader {
                // The appends above are queued on this worker: yield once so
                // their peer tasks write them, then sync here. Handing the
                // fsync to the blocking pool cost a thread wakeup each way
                // (~80 + ~40 µs on the benchmark box) and two context
                // switches per put on a node that is already the busiest;
                // single-client puts were 3-5 % slower that way.
                let wb = batch.into_write_batch();
                tokio::task::yield_now().await;
                self.engine.write(wb, true)?;
            } else {
                // A follower (or candidate) has nothing to send before the
                // fsync, and its answer is what the leader waits for: two
                // thread handoffs around the fsync would sit on the commit
                // path, so it syncs right here.
                batch.commit(must_sync)?;
            }
        }

        self.transport.send(ready.take_persisted_messages());

        for rs in ready.take_read_states() {
            if let Some(waiters) = self.reads_inflight.remove(&rs.request_ctx) {
                self.reads_waiting
                    .extend(waiters.into_iter().map(|w| (rs.index, w)));
            }
        }

        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            let mut batch = self.engine.batch();
            self.raw.mut_store().set_commit(commit, &mut batch)?;
            batch.commit(false)?;
        }
        self.transport.send(light.take_messages());
        self.apply_entries(light.take_committed_entries())?;
        self.raw.advance_apply();
        self.release_reads();
        self.maybe_compact().await
    }

    fn apply_entries(&mut self, entries: Vec<Entry>) -> Result<(), MetaError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut overlay = Overlay::default();
        let mut replies: Vec<(u64, Result<CommandResult, MetaError>)> = Vec::new();
        let mut new_conf: Option<ConfState> = None;
        for entry in &entries {
            let mut step = Overlay::default();
            match entry.get_entry_type() {
                EntryType::EntryNormal if entry.data.is_empty() => {}
                EntryType::EntryNormal => match Command::decode(entry.data.as_ref()) {
                    Ok(cmd) => {
                        let base = StateCf(&self.engine);
                        let view = Layered {
                            base: &base,
                            overlay: &overlay,
                        };
                        let res = state::apply(&view, &mut step, &cmd)?;
                        if cmd.origin_node == self.id {
                            replies.push((cmd.request_id, Ok(res)));
                        }
                    }
                    Err(e) => {
                        tracing::warn!(node = self.id, index = entry.index, error = %e,
                            "skipping a committed command this version cannot decode");
                    }
                },
                EntryType::EntryConfChange => {
                    let cc = ConfChange::parse_from_bytes(&entry.data)?;
                    let ctx = ConfChangeContext::decode(cc.context.as_ref()).unwrap_or_default();
                    let result = match self.raw.apply_conf_change(&cc) {
                        Ok(cs) => {
                            let base = StateCf(&self.engine);
                            let view = Layered {
                                base: &base,
                                overlay: &overlay,
                            };
                            let role = match cc.get_change_type() {
                                ConfChangeType::AddNode => NodeRole::Voter,
                                ConfChangeType::AddLearnerNode => NodeRole::Learner,
                                ConfChangeType::RemoveNode => NodeRole::Removed,
                            };
                            let mut node = ctx.node.clone().unwrap_or_default();
                            node.id = cc.node_id;
                            state::apply_membership(
                                &view,
                                &mut step,
                                &node,
                                role,
                                node.added_unix_ms,
                            )?;
                            step.put(KEY_CONF_STATE.to_vec(), cs.write_to_bytes()?);
                            tracing::info!(node = self.id, target = cc.node_id, change = ?cc.get_change_type(),
                                voters = ?cs.voters, learners = ?cs.learners, "membership changed");
                            if role == NodeRole::Removed && cc.node_id == self.id {
                                tracing::warn!(
                                    node = self.id,
                                    "this node was removed from the cluster"
                                );
                            }
                            new_conf = Some(cs);
                            Ok(CommandResult::default())
                        }
                        Err(e) => Err(MetaError::Rejected {
                            code: codes::INVALID,
                            message: format!("membership change refused: {e}"),
                        }),
                    };
                    if ctx.origin_node == self.id {
                        replies.push((ctx.request_id, result));
                    }
                }
                EntryType::EntryConfChangeV2 => {
                    tracing::warn!(
                        node = self.id,
                        index = entry.index,
                        "ignoring unsupported ConfChangeV2 entry"
                    );
                }
            }
            overlay.writes.extend(step.writes);
            self.applied = entry.index;
            self.applied_term = entry.term;
        }
        overlay.put(
            KEY_APPLIED.to_vec(),
            encode_pair(self.applied, self.applied_term),
        );

        let catalog = overlay
            .writes
            .iter()
            .any(|(k, v)| state::touches_catalog(k, v.is_some()));
        let mut batch = self.engine.batch();
        for (k, v) in &overlay.writes {
            match v {
                Some(v) => batch.put(CF_STATE, k, v)?,
                None => batch.delete(CF_STATE, k)?,
            }
        }
        let applied = self.applied;
        self.raw.mut_store().set_commit(applied, &mut batch)?;
        if let Some(cs) = &new_conf {
            self.raw.mut_store().set_conf_state(cs, &mut batch)?;
            // Membership is what raft-rs starts from: logged, so the raft
            // and state column families can never disagree on it.
            batch.commit(false)?;
        } else {
            // Not logged to the WAL, as etcd applies to bbolt without a
            // sync: the entries are durable in the raft log, the applied
            // index is in this same batch, so a crash that loses it makes
            // the node apply them again from the log at start. The log is
            // only compacted after a flush (`maybe_compact`). This is a WAL
            // write less on the commit path of every proposal: single-client
            // puts went from ~950-1,010 to ~1,045-1,075 per second.
            batch.commit_unlogged()?;
        }
        if catalog {
            self.engine.bump_catalog_era();
        }

        if let Some(cs) = new_conf {
            self.conf_state = cs;
            self.refresh_peers()?;
        }
        for (rid, res) in replies {
            if let Some(w) = self.proposals.remove(&rid) {
                let _ = w.send(res);
            }
        }
        self.release_reads();
        Ok(())
    }

    async fn maybe_compact(&mut self) -> Result<(), MetaError> {
        let first = self.raw.store().truncated_index() + 1;
        if self.applied < first + self.settings.compact_threshold {
            return Ok(());
        }
        let to = self.applied.saturating_sub(self.settings.compact_retain);
        // Applied state is written without the WAL (`apply_entries`): after
        // a crash, what the memtables held is redone from the log. Entries
        // may only go once the state they produced is on disk.
        let engine = self.engine.clone();
        off_worker(move || engine.flush()).await?;
        let mut batch = self.engine.batch();
        self.raw.mut_store().compact(to, &mut batch)?;
        self.write_off_worker(batch, false).await?;
        tracing::debug!(node = self.id, compacted_below = to, "raft log compacted");
        Ok(())
    }

    /// Points the transport at every member's current address.
    fn refresh_peers(&mut self) -> Result<(), MetaError> {
        let mut members: Vec<u64> = self.conf_state.voters.clone();
        members.extend(&self.conf_state.learners);
        for (_, bytes) in self.engine.scan(CF_STATE, PREFIX_NODE)? {
            let Ok(node) = NodeRecord::decode(bytes.as_slice()) else {
                continue;
            };
            if node.id == self.id || node.rpc_addr.is_empty() {
                continue;
            }
            if members.contains(&node.id) {
                self.transport.set_peer(node.id, &node.rpc_addr);
            } else {
                self.transport.remove_peer(node.id);
            }
        }
        Ok(())
    }
}

/// Runs blocking disk work on the runtime's blocking pool.
async fn off_worker<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, MetaError> + Send + 'static,
) -> Result<T, MetaError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| MetaError::Storage(format!("metadata disk write did not finish: {e}")))?
}
