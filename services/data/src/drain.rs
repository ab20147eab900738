//! Draining a node announced for maintenance (`NodeMaintenance`).
//!
//! While the node still runs, the metadata leader moves the ownership of
//! the vdisks it owns to other nodes (`SetVdiskOwner`, as a failover does),
//! and new extent groups and rebuilt replicas go to other nodes while the
//! mark lasts (`DataService::place`, `pick_target`). When the node then
//! stops, hosts see no failover: without a drain its vdisks stalled until
//! it was found dead (5 s of silence) and every group was then taken over
//! under load; after it, its replicas are only dropped and waited for.
//!
//! A vdisk moves only when every one of its extent groups has a replica on
//! a node that is neither in maintenance nor dead: one whose only copies
//! are on such nodes (RF1, or a group short of replicas) would be served
//! from there remotely until the node stops and then not at all, so it
//! stays where it is, and the drain task names it. The move is a takeover
//! like any other: the new owner fences the old one group by group
//! (`Volume::ensure_ready`), and a host's session on the old node follows
//! the owner (`route::Routed`).
//!
//! A leader in maintenance also hands raft leadership to a voter outside
//! it, so that its stop costs no election.
//!
//! Progress is a `drain` task per mark (`drain-<node>-<mark start>`, so a
//! new leader continues the same task), in bytes of vdisk size: moved out
//! of moved plus still to move. It is done when nothing movable is left
//! on the node, and closed when the mark ends.

use std::collections::{HashMap, HashSet};

use cairn_api::metadata::v1::{ExtentGroupRecord, NodeMaintenance, TaskRecord, TaskState};
use cairn_metadata::handle::drain_task_id;
use cairn_metadata::MetadataHandle;

use crate::repair::most_replicas;
use crate::volume::{meta_err, DataService};
use crate::DataError;

/// Task kind of a drain.
pub const DRAIN_KIND: &str = "drain";

/// Unexpired maintenance marks by node id; none when they cannot be read
/// (the callers then act as without marks: no drain, no longer wait).
pub(crate) fn current_marks(meta: &MetadataHandle) -> HashMap<u64, NodeMaintenance> {
    let now = cairn_util::now_unix_ms();
    match meta.maintenance() {
        Ok(marks) => marks
            .into_iter()
            .filter(|m| m.until_unix_ms > now)
            .map(|m| (m.node_id, m))
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read node maintenance marks");
            HashMap::new()
        }
    }
}

/// Whether `t` is the drain task of its node's current mark.
fn of_current_mark(marks: &HashMap<u64, NodeMaintenance>, t: &TaskRecord) -> bool {
    marks
        .get(&t.node_id)
        .is_some_and(|m| drain_task_id(m.node_id, m.started_unix_ms) == t.id)
}

/// The drain tasks the leader writes, kept between monitor passes.
#[derive(Default)]
pub(crate) struct Drains {
    /// The running drain tasks in metadata were read once in this
    /// leadership (a previous leader may have left some).
    adopted: bool,
    /// node id -> its running drain task.
    tasks: HashMap<u64, TaskRecord>,
}

impl Drains {
    /// Forgets everything once this node is not the leader: the next
    /// leader goes on with the tasks from metadata.
    pub(crate) fn resign(&mut self) {
        self.adopted = false;
        self.tasks.clear();
    }
}

/// Why a vdisk on a node in maintenance cannot move, if it cannot, else
/// the node to move it to ([`most_replicas`] outside `away`).
fn move_target(
    groups: &[&ExtentGroupRecord],
    away: &HashSet<u64>,
    candidates: &[u64],
) -> Result<u64, &'static str> {
    if groups
        .iter()
        .any(|g| g.replicas.iter().all(|r| away.contains(&r.node_id)))
    {
        return Err(
            "every copy of some of its data is on nodes in maintenance or down \
             (RF1, or a group short of replicas)",
        );
    }
    most_replicas(groups, away, candidates).ok_or("no node outside maintenance can take it")
}

impl DataService {
    /// One drain pass (metadata leader only): moves what can move off the
    /// nodes in maintenance that are alive (a dead owner's vdisks are
    /// `fail_over_owners`' work) and keeps each mark's task current.
    pub(crate) async fn drain_maintenance(
        &self,
        dead: &HashSet<u64>,
        st: &mut Drains,
    ) -> Result<(), DataError> {
        let marks = current_marks(&self.meta);
        if !st.adopted {
            // A previous leader's task of a current mark is continued (its
            // progress kept); its running ones of marks that ended while
            // no leader watched are closed below like any other.
            for t in self.meta.tasks().map_err(meta_err)? {
                let current = of_current_mark(&marks, &t);
                if t.kind != DRAIN_KIND || !(current || t.state == TaskState::TaskRunning as i32) {
                    continue;
                }
                // The current mark's task wins over an older running one.
                if current
                    || !st
                        .tasks
                        .get(&t.node_id)
                        .is_some_and(|o| of_current_mark(&marks, o))
                {
                    st.tasks.insert(t.node_id, t);
                }
            }
            st.adopted = true;
        }
        let now = cairn_util::now_unix_ms();
        // Marks that ended or were replaced by a newer one.
        let ended: Vec<u64> = st
            .tasks
            .iter()
            .filter(|(_, t)| !of_current_mark(&marks, t))
            .map(|(node, _)| *node)
            .collect();
        for node in ended {
            if let Some(mut t) = st
                .tasks
                .remove(&node)
                .filter(|t| t.state == TaskState::TaskRunning as i32)
            {
                t.state = TaskState::TaskDone as i32;
                t.updated_unix_ms = now;
                t.message = format!("the maintenance mark ended or was replaced; {}", t.message);
                self.put_task(&t).await;
            }
        }
        if marks.is_empty() {
            return Ok(());
        }

        let away: HashSet<u64> = marks.keys().chain(dead.iter()).copied().collect();
        let candidates: Vec<u64> = self
            .node_ids()?
            .into_iter()
            .filter(|id| !away.contains(id) && (*id == self.node_id || self.peers.is_up(*id)))
            .collect();
        let all_groups = self.meta.extent_groups().map_err(meta_err)?;
        let mut by_vdisk: HashMap<&str, Vec<_>> = HashMap::new();
        for g in &all_groups {
            by_vdisk.entry(g.vdisk_id.as_str()).or_default().push(g);
        }
        let vdisks = self.meta.all_vdisks().map_err(meta_err)?;

        for (node, mark) in &marks {
            if dead.contains(node) {
                continue;
            }
            let mut moved = 0u64;
            let mut left = 0u64;
            let mut stays: Vec<String> = Vec::new();
            for vd in vdisks.iter().filter(|v| v.owner_node_id == *node) {
                let groups = by_vdisk.get(vd.id.as_str()).map_or(&[][..], |g| &g[..]);
                let to = match move_target(groups, &away, &candidates) {
                    Ok(to) => to,
                    Err(why) => {
                        stays.push(format!("{} ({})", vd.name, why));
                        continue;
                    }
                };
                match self.set_vdisk_owner(vd, to).await {
                    Ok(()) => {
                        moved += vd.size_bytes;
                        tracing::info!(vdisk = %vd.id, name = %vd.name, from = node, to,
                            owner_epoch = vd.owner_epoch + 1,
                            "vdisk ownership moved off a node in maintenance");
                    }
                    Err(e) => {
                        left += vd.size_bytes;
                        tracing::warn!(vdisk = %vd.id, error = %e,
                            "cannot move vdisk ownership off a node in maintenance yet");
                    }
                }
            }
            let id = drain_task_id(*node, mark.started_unix_ms);
            let known = st.tasks.contains_key(node);
            let t = st.tasks.entry(*node).or_insert_with(|| TaskRecord {
                format_version: cairn_api::FORMAT_VERSION,
                id,
                kind: DRAIN_KIND.into(),
                state: TaskState::TaskRunning as i32,
                node_id: *node,
                description: format!(
                    "moving the vdisks node {node} owns to other nodes before its maintenance"
                ),
                started_unix_ms: now,
                ..Default::default()
            });
            let message = if stays.is_empty() {
                String::new()
            } else {
                format!(
                    "{} vdisk(s) stay on node {node}: {}",
                    stays.len(),
                    stays.join("; ")
                )
            };
            let state = if left == 0 {
                TaskState::TaskDone
            } else {
                TaskState::TaskRunning
            };
            if known && moved == 0 && t.message == message && t.state == state as i32 {
                continue;
            }
            t.done_bytes += moved;
            t.total_bytes = t.done_bytes + left;
            t.state = state as i32;
            t.message = message;
            t.updated_unix_ms = now;
            if !stays.is_empty() && (!known || moved > 0) {
                tracing::warn!(
                    node,
                    stays = stays.len(),
                    "vdisks stay on a node in maintenance: {}",
                    t.message
                );
            }
            self.put_task(t).await;
        }
        if marks.contains_key(&self.node_id) {
            self.hand_over_leadership(&away).await;
        }
        Ok(())
    }

    /// This leader is in maintenance: raft leadership goes to the most
    /// caught-up live voter outside maintenance, so that the node's stop
    /// costs the cluster no election (metadata writes, and every vdisk
    /// lookup that needs a read barrier, wait for one). Asked again each
    /// pass while this node still leads (an election may bring it back).
    async fn hand_over_leadership(&self, away: &HashSet<u64>) {
        let Ok(status) = self.meta.status().await else {
            return;
        };
        if status.role != "leader" {
            return;
        }
        let matched: HashMap<u64, u64> = status.progress.iter().copied().collect();
        let to = status
            .voters
            .iter()
            .copied()
            .filter(|v| *v != self.node_id && !away.contains(v) && self.peers.is_up(*v))
            .max_by_key(|v| (matched.get(v).copied().unwrap_or(0), u64::MAX - v));
        let Some(to) = to else {
            tracing::warn!(
                node = self.node_id,
                "this metadata leader is in maintenance, but no live voter outside maintenance \
                 can take the leadership over"
            );
            return;
        };
        if let Err(e) = self.meta.transfer_leadership(to) {
            tracing::warn!(to, error = %e, "cannot hand metadata leadership over");
        }
    }
}
