//! Cairn's replicated state machine, free of I/O: `apply` turns one committed
//! command into key writes and a result, reading through a [`StateView`].
//! Every decision (name conflicts, validation, ids, timestamps) depends only on
//! the command and the prior state, so every replica computes the same thing.
//!
//! Key layout (all values are versioned protobuf records):
//! - `c/cluster`              ClusterRecord
//! - `n/<id be64>`            NodeRecord
//! - `d/<datastore name>`     DatastoreRecord
//! - `v/<datastore>/<vdisk>`  VdiskRecord
//! - `s/<disk id>`            DiskRecord
//! - `i/<vdisk id>`           the `v/...` key of that vdisk (lookup by id)
//! - `p/<vdisk id>/<name>`    SnapshotRecord
//! - `g/<egroup id be64>`     ExtentGroupRecord
//! - `b/<vdisk id>/<vblock be64>/<generation be64>`  VblockMapping
//! - `t/<iqn>`                IscsiTargetRecord (rules and commands in [`crate::iscsi`])
//! - `k/<key>`                raw value of the key-value interface
//! - `m/...`                  bookkeeping of the apply loop (applied index, conf state)

use std::collections::BTreeMap;

use cairn_api::metadata::v1::{
    command::Op, ClusterRecord, Command, CommandResult, DatastoreRecord, ExtentGroupRecord,
    NodeRecord, NodeRole, SnapshotRecord, VblockMapping, VdiskRecord,
};
use cairn_api::record::Record;
use cairn_util::error_code::{codes, ErrorCode};
use prost::Message;

use crate::MetaError;

pub const KEY_CLUSTER: &[u8] = b"c/cluster";
pub const PREFIX_NODE: &[u8] = b"n/";
pub const PREFIX_DATASTORE: &[u8] = b"d/";
pub const PREFIX_VDISK: &[u8] = b"v/";
pub const PREFIX_KV: &[u8] = b"k/";
pub const KEY_APPLIED: &[u8] = b"m/applied";
pub const KEY_CONF_STATE: &[u8] = b"m/conf_state";

/// Largest vdisk: 64 TiB.
pub const MAX_VDISK_BYTES: u64 = 64 << 40;

pub fn node_key(id: u64) -> Vec<u8> {
    [PREFIX_NODE, &id.to_be_bytes()[..]].concat()
}
pub fn datastore_key(name: &str) -> Vec<u8> {
    [PREFIX_DATASTORE, name.as_bytes()].concat()
}
pub fn vdisk_prefix(datastore: &str) -> Vec<u8> {
    [PREFIX_VDISK, datastore.as_bytes(), b"/"].concat()
}
pub fn vdisk_key(datastore: &str, name: &str) -> Vec<u8> {
    [vdisk_prefix(datastore).as_slice(), name.as_bytes()].concat()
}
pub fn kv_key(key: &[u8]) -> Vec<u8> {
    [PREFIX_KV, key].concat()
}
pub const PREFIX_DISK: &[u8] = b"s/";
pub const PREFIX_GROUP: &[u8] = b"g/";
/// vdisk id → its `v/...` key.
pub const PREFIX_VDISK_ID: &[u8] = b"i/";
pub const PREFIX_SNAPSHOT: &[u8] = b"p/";
/// vdisk block → extent group mappings.
pub const PREFIX_MAPPING: &[u8] = b"b/";
pub fn vdisk_id_key(id: &str) -> Vec<u8> {
    [PREFIX_VDISK_ID, id.as_bytes()].concat()
}
pub fn snapshot_prefix(vdisk_id: &str) -> Vec<u8> {
    [PREFIX_SNAPSHOT, vdisk_id.as_bytes(), b"/"].concat()
}
pub fn snapshot_key(vdisk_id: &str, name: &str) -> Vec<u8> {
    [snapshot_prefix(vdisk_id).as_slice(), name.as_bytes()].concat()
}
pub fn group_key(id: u64) -> Vec<u8> {
    [PREFIX_GROUP, &id.to_be_bytes()[..]].concat()
}
pub fn disk_key(id: &str) -> Vec<u8> {
    [PREFIX_DISK, id.as_bytes()].concat()
}
pub fn mapping_prefix(vdisk_id: &str) -> Vec<u8> {
    [PREFIX_MAPPING, vdisk_id.as_bytes(), b"/"].concat()
}
pub fn mapping_vblock_prefix(vdisk_id: &str, vblock: u64) -> Vec<u8> {
    [
        mapping_prefix(vdisk_id).as_slice(),
        &vblock.to_be_bytes()[..],
        b"/",
    ]
    .concat()
}
pub fn mapping_key(vdisk_id: &str, vblock: u64, generation: u64) -> Vec<u8> {
    [
        mapping_vblock_prefix(vdisk_id, vblock).as_slice(),
        &generation.to_be_bytes()[..],
    ]
    .concat()
}

/// Whether writing (`put`) or removing `key` changes what
/// [`crate::engine::Engine::catalog_era`] guards.
pub fn touches_catalog(key: &[u8], put: bool) -> bool {
    const CATALOG: [&[u8]; 5] = [
        PREFIX_NODE,
        PREFIX_DATASTORE,
        PREFIX_VDISK,
        PREFIX_VDISK_ID,
        PREFIX_SNAPSHOT,
    ];
    CATALOG.iter().any(|p| key.starts_with(p)) || (!put && key.starts_with(PREFIX_MAPPING))
}

/// A vdisk's `v/...` key and its record.
pub type KeyedVdisk = (Vec<u8>, Record<VdiskRecord>);

/// The vdisk with id `id`: its `v/...` key and record.
pub fn vdisk_by_id(view: &dyn StateView, id: &str) -> Result<Option<KeyedVdisk>, MetaError> {
    let Some(key) = view.get(&vdisk_id_key(id))? else {
        return Ok(None);
    };
    match view.get(&key)? {
        Some(b) => Ok(Some((key, Record::<VdiskRecord>::decode(&b)?))),
        None => Ok(None),
    }
}

/// Key-value pairs in key order.
pub type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

/// Read access to the state the next command applies on.
pub trait StateView {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, MetaError>;
    /// All pairs whose key starts with `prefix`, in key order.
    fn scan(&self, prefix: &[u8]) -> Result<Pairs, MetaError>;
}

/// Writes produced by applying commands, visible to later commands of the
/// same batch before they reach the engine.
#[derive(Default, Debug)]
pub struct Overlay {
    pub writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl Overlay {
    pub fn put(&mut self, k: Vec<u8>, v: Vec<u8>) {
        self.writes.insert(k, Some(v));
    }
    pub fn delete(&mut self, k: Vec<u8>) {
        self.writes.insert(k, None);
    }
}

/// `base` with `overlay` on top.
pub struct Layered<'a, V: StateView + ?Sized> {
    pub base: &'a V,
    pub overlay: &'a Overlay,
}

impl<V: StateView + ?Sized> StateView for Layered<'_, V> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, MetaError> {
        match self.overlay.writes.get(key) {
            Some(v) => Ok(v.clone()),
            None => self.base.get(key),
        }
    }
    fn scan(&self, prefix: &[u8]) -> Result<Pairs, MetaError> {
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = self.base.scan(prefix)?.into_iter().collect();
        for (k, v) in self.overlay.writes.range(prefix.to_vec()..) {
            if !k.starts_with(prefix) {
                break;
            }
            match v {
                Some(v) => merged.insert(k.clone(), v.clone()),
                None => merged.remove(k),
            };
        }
        Ok(merged.into_iter().collect())
    }
}

/// An in-memory view, for tests and simulation.
impl StateView for BTreeMap<Vec<u8>, Vec<u8>> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, MetaError> {
        Ok(BTreeMap::get(self, key).cloned())
    }
    fn scan(&self, prefix: &[u8]) -> Result<Pairs, MetaError> {
        Ok(self
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
}

fn fail(code: ErrorCode, message: impl Into<String>) -> CommandResult {
    CommandResult {
        error_code: code.code.to_string(),
        error_message: message.into(),
        ..Default::default()
    }
}

/// Largest value of one key of a vdisk's front-end state (a few thousand
/// SCSI registrations).
const MAX_FRONTEND_STATE: usize = 256 << 10;

fn vdisk_not_found(id: &str) -> CommandResult {
    fail(codes::NOT_FOUND, format!("vdisk {id} not found"))
}

fn ok_record(bytes: Vec<u8>) -> CommandResult {
    CommandResult {
        record: bytes,
        ..Default::default()
    }
}

/// Checks a datastore or vdisk name: 1-63 of `[A-Za-z0-9._-]`, not starting with `.` or `-`.
pub fn validate_name(kind: &str, name: &str) -> Result<(), String> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if name.is_empty() || name.len() > 63 || !ok_chars || name.starts_with(['.', '-']) {
        return Err(format!(
            "invalid {kind} name {name:?}: use 1-63 characters from A-Z a-z 0-9 . _ - (not starting with . or -)"
        ));
    }
    Ok(())
}

/// Checks a vdisk size: positive, a multiple of 4 KiB, at most 64 TiB.
pub fn validate_size(size: u64) -> Result<(), String> {
    if size == 0 || !size.is_multiple_of(4096) || size > MAX_VDISK_BYTES {
        return Err(format!(
            "invalid vdisk size {size}: must be a positive multiple of 4096 bytes, at most 64 TiB"
        ));
    }
    Ok(())
}

/// Applies one normal command. Errors in the result are deterministic outcomes
/// (conflict, not found); `Err` means the engine failed and the node must stop.
pub fn apply(
    view: &dyn StateView,
    out: &mut Overlay,
    cmd: &Command,
) -> Result<CommandResult, MetaError> {
    let now = cmd.proposed_unix_ms;
    let Some(op) = &cmd.op else {
        // A command from a newer version with an operation we do not know:
        // apply nothing and say so, identically on every node of this version.
        return Ok(fail(codes::INVALID, "unknown operation (newer version?)"));
    };
    Ok(match op {
        Op::PutKv(p) => {
            out.put(kv_key(&p.key), p.value.clone());
            CommandResult::default()
        }
        Op::DeleteKv(d) => {
            out.delete(kv_key(&d.key));
            CommandResult::default()
        }
        Op::InitCluster(init) => {
            if view.get(KEY_CLUSTER)?.is_some() {
                return Ok(fail(codes::CONFLICT, "cluster already initialised"));
            }
            let mut cluster = init.cluster.clone().unwrap_or_default();
            cluster.created_unix_ms = now;
            if let Some(node) = &init.first_node {
                cluster.next_node_id = cluster.next_node_id.max(node.id + 1);
                out.put(node_key(node.id), node.encode_to_vec());
            }
            out.put(KEY_CLUSTER.to_vec(), cluster.encode_to_vec());
            CommandResult::default()
        }
        Op::AllocateNodeId(_) => {
            let Some(bytes) = view.get(KEY_CLUSTER)? else {
                return Ok(fail(codes::INVALID, "cluster not initialised"));
            };
            let mut cluster = Record::<ClusterRecord>::decode(&bytes)?;
            let id = cluster.msg.next_node_id.max(1);
            cluster.msg.next_node_id = id + 1;
            out.put(KEY_CLUSTER.to_vec(), cluster.encode());
            CommandResult {
                allocated_id: id,
                ..Default::default()
            }
        }
        Op::CreateDatastore(c) => {
            if let Err(e) = validate_name("datastore", &c.name) {
                return Ok(fail(codes::INVALID, e));
            }
            if !(1..=3).contains(&c.replication_factor) {
                return Ok(fail(
                    codes::INVALID,
                    format!(
                        "replication factor {} not supported: use 1, 2 or 3",
                        c.replication_factor
                    ),
                ));
            }
            let key = datastore_key(&c.name);
            if view.get(&key)?.is_some() {
                return Ok(fail(
                    codes::CONFLICT,
                    format!("datastore {:?} already exists", c.name),
                ));
            }
            let rec = DatastoreRecord {
                format_version: cairn_api::FORMAT_VERSION,
                id: c.id.clone(),
                name: c.name.clone(),
                replication_factor: c.replication_factor,
                compression: c.compression,
                tiering: c.tiering.clone(),
                created_unix_ms: now,
            };
            let bytes = rec.encode_to_vec();
            out.put(key, bytes.clone());
            ok_record(bytes)
        }
        Op::DeleteDatastore(d) => {
            let key = datastore_key(&d.name);
            if view.get(&key)?.is_none() {
                return Ok(fail(
                    codes::NOT_FOUND,
                    format!("datastore {:?} not found", d.name),
                ));
            }
            let vdisks = view.scan(&vdisk_prefix(&d.name))?;
            if !vdisks.is_empty() {
                return Ok(fail(
                    codes::CONFLICT,
                    format!(
                        "datastore {:?} still holds {} vdisk(s); delete them first",
                        d.name,
                        vdisks.len()
                    ),
                ));
            }
            out.delete(key);
            CommandResult::default()
        }
        Op::CreateVdisk(c) => {
            if let Err(e) = validate_name("vdisk", &c.name).and(validate_size(c.size_bytes)) {
                return Ok(fail(codes::INVALID, e));
            }
            let Some(ds_bytes) = view.get(&datastore_key(&c.datastore))? else {
                return Ok(fail(
                    codes::NOT_FOUND,
                    format!("datastore {:?} not found", c.datastore),
                ));
            };
            let datastore = Record::<DatastoreRecord>::decode(&ds_bytes)?;
            let key = vdisk_key(&c.datastore, &c.name);
            if view.get(&key)?.is_some() {
                return Ok(fail(
                    codes::CONFLICT,
                    format!(
                        "vdisk {:?} already exists in datastore {:?}",
                        c.name, c.datastore
                    ),
                ));
            }
            let owner = if c.owner_node_id == 0 {
                cmd.origin_node
            } else {
                c.owner_node_id
            };
            if view.get(&node_key(owner))?.is_none() {
                return Ok(fail(
                    codes::INVALID,
                    format!("owner node {owner} is not a cluster member"),
                ));
            }
            let rec = VdiskRecord {
                format_version: cairn_api::FORMAT_VERSION,
                id: c.id.clone(),
                name: c.name.clone(),
                datastore_id: datastore.msg.id.clone(),
                size_bytes: c.size_bytes,
                owner_node_id: owner,
                created_unix_ms: now,
                owner_epoch: 1,
                ..Default::default()
            };
            let bytes = rec.encode_to_vec();
            out.put(vdisk_id_key(&c.id), key.clone());
            out.put(key, bytes.clone());
            ok_record(bytes)
        }
        Op::DeleteVdisk(d) => {
            let key = vdisk_key(&d.datastore, &d.name);
            let Some(bytes) = view.get(&key)? else {
                return Ok(fail(
                    codes::NOT_FOUND,
                    format!(
                        "vdisk {:?} not found in datastore {:?}",
                        d.name, d.datastore
                    ),
                ));
            };
            let rec = Record::<VdiskRecord>::decode(&bytes)?;
            // Refused rather than unmapped behind the hosts' back: a host
            // logged in to the target may be using the disk right now.
            if let Some((iqn, lun)) = crate::iscsi::exported_as(view, &rec.msg.id)? {
                return Ok(fail(
                    codes::CONFLICT,
                    format!(
                        "vdisk {:?} is LUN {lun} of iSCSI target {iqn:?}; unmap it or delete the target first",
                        d.name
                    ),
                ));
            }
            let snaps = view.scan(&snapshot_prefix(&rec.msg.id))?;
            if !snaps.is_empty() {
                return Ok(fail(
                    codes::CONFLICT,
                    format!(
                        "vdisk {:?} has {} snapshot(s); delete them first",
                        d.name,
                        snaps.len()
                    ),
                ));
            }
            // Its extent groups go with it; the data service deletes the
            // files of groups that metadata no longer knows.
            for (mk, mv) in view.scan(&mapping_prefix(&rec.msg.id))? {
                let m = Record::<VblockMapping>::decode(&mv)?;
                out.delete(group_key(m.msg.extent_group_id));
                out.delete(mk);
            }
            out.delete(vdisk_id_key(&rec.msg.id));
            out.delete(key);
            CommandResult::default()
        }
        Op::ResizeVdisk(r) => {
            let key = vdisk_key(&r.datastore, &r.name);
            let Some(bytes) = view.get(&key)? else {
                return Ok(fail(
                    codes::NOT_FOUND,
                    format!(
                        "vdisk {:?} not found in datastore {:?}",
                        r.name, r.datastore
                    ),
                ));
            };
            if let Err(e) = validate_size(r.size_bytes) {
                return Ok(fail(codes::INVALID, e));
            }
            let mut rec = Record::<VdiskRecord>::decode(&bytes)?;
            if r.size_bytes < rec.msg.size_bytes {
                return Ok(fail(
                    codes::CONFLICT,
                    format!(
                        "shrinking vdisk {:?} from {} to {} bytes would discard data; only growing is allowed",
                        r.name, rec.msg.size_bytes, r.size_bytes
                    ),
                ));
            }
            rec.msg.size_bytes = r.size_bytes;
            let bytes = rec.encode();
            out.put(key, bytes.clone());
            ok_record(bytes)
        }
        Op::PutDisk(p) => {
            let disk = p.disk.clone().unwrap_or_default();
            out.put(disk_key(&disk.id), disk.encode_to_vec());
            CommandResult::default()
        }
        Op::AllocateExtentGroup(a) => {
            let g = a.group.clone().unwrap_or_default();
            let Some((_, vd)) = vdisk_by_id(view, &g.vdisk_id)? else {
                return Ok(vdisk_not_found(&g.vdisk_id));
            };
            if vd.msg.generation != g.generation {
                return Ok(fail(
                    codes::CONFLICT,
                    format!(
                        "vdisk {} is at generation {}, not {} (a snapshot was taken)",
                        g.vdisk_id, vd.msg.generation, g.generation
                    ),
                ));
            }
            let mkey = mapping_key(&g.vdisk_id, g.vblock, g.generation);
            if let Some(m) = view.get(&mkey)? {
                // Someone mapped it first: hand back their group.
                let m = Record::<VblockMapping>::decode(&m)?;
                let existing = view
                    .get(&group_key(m.msg.extent_group_id))?
                    .unwrap_or_default();
                return Ok(CommandResult {
                    error_code: codes::CONFLICT.code.to_string(),
                    error_message: format!("vblock {} is already mapped", g.vblock),
                    record: existing,
                    ..Default::default()
                });
            }
            let key = group_key(g.id);
            if view.get(&key)?.is_some() {
                return Ok(fail(
                    codes::CONFLICT,
                    format!("extent group {} exists", g.id),
                ));
            }
            let mapping = VblockMapping {
                format_version: cairn_api::FORMAT_VERSION,
                vdisk_id: g.vdisk_id.clone(),
                vblock: g.vblock,
                extent_group_id: g.id,
                extent_index: 0,
                generation: g.generation,
            };
            out.put(mkey, mapping.encode_to_vec());
            let bytes = g.encode_to_vec();
            out.put(key, bytes.clone());
            ok_record(bytes)
        }
        Op::SetVblockMapping(_) => fail(
            codes::INVALID,
            "SetVblockMapping is superseded by AllocateExtentGroup",
        ),
        Op::UpdateExtentGroup(u) => {
            let key = group_key(u.id);
            let Some(bytes) = view.get(&key)? else {
                return Ok(fail(
                    codes::NOT_FOUND,
                    format!("extent group {} not found", u.id),
                ));
            };
            let mut g = Record::<ExtentGroupRecord>::decode(&bytes)?;
            if g.msg.epoch != u.expect_epoch || u.new_epoch <= g.msg.epoch {
                return Ok(CommandResult {
                    error_code: codes::CONFLICT.code.to_string(),
                    error_message: format!(
                        "extent group {} is at epoch {}, not {}",
                        u.id, g.msg.epoch, u.expect_epoch
                    ),
                    record: bytes,
                    ..Default::default()
                });
            }
            g.msg.epoch = u.new_epoch;
            g.msg.replicas = u.replicas.clone();
            let bytes = g.encode();
            out.put(key, bytes.clone());
            ok_record(bytes)
        }
        Op::DeleteExtentGroup(d) => {
            let key = group_key(d.id);
            if let Some(bytes) = view.get(&key)? {
                let g = Record::<ExtentGroupRecord>::decode(&bytes)?;
                let mkey = mapping_key(&g.msg.vdisk_id, g.msg.vblock, g.msg.generation);
                if let Some(m) = view.get(&mkey)? {
                    if Record::<VblockMapping>::decode(&m)?.msg.extent_group_id == d.id {
                        out.delete(mkey);
                    }
                }
                out.delete(key);
            }
            CommandResult::default()
        }
        Op::CreateSnapshot(c) => {
            if let Err(e) = validate_name("snapshot", &c.name) {
                return Ok(fail(codes::INVALID, e));
            }
            let Some((vkey, mut vd)) = vdisk_by_id(view, &c.vdisk_id)? else {
                return Ok(vdisk_not_found(&c.vdisk_id));
            };
            let skey = snapshot_key(&c.vdisk_id, &c.name);
            if view.get(&skey)?.is_some() {
                return Ok(fail(
                    codes::CONFLICT,
                    format!("snapshot {:?} already exists", c.name),
                ));
            }
            let snap = SnapshotRecord {
                format_version: cairn_api::FORMAT_VERSION,
                id: c.id.clone(),
                name: c.name.clone(),
                vdisk_id: c.vdisk_id.clone(),
                generation: vd.msg.generation,
                created_unix_ms: now,
            };
            // Instant: nothing is copied; later writes go to a new generation.
            vd.msg.generation += 1;
            out.put(vkey, vd.encode());
            let bytes = snap.encode_to_vec();
            out.put(skey, bytes.clone());
            ok_record(bytes)
        }
        Op::DeleteSnapshot(d) => {
            let skey = snapshot_key(&d.vdisk_id, &d.name);
            let Some(bytes) = view.get(&skey)? else {
                return Ok(fail(
                    codes::NOT_FOUND,
                    format!("snapshot {:?} not found", d.name),
                ));
            };
            let snap = Record::<SnapshotRecord>::decode(&bytes)?;
            let clones = view
                .scan(PREFIX_VDISK)?
                .into_iter()
                .filter_map(|(_, v)| Record::<VdiskRecord>::decode(&v).ok())
                .filter(|v| {
                    v.msg.parent_vdisk_id == d.vdisk_id
                        && v.msg.parent_generation == snap.msg.generation
                })
                .count();
            if clones > 0 {
                return Ok(fail(
                    codes::CONFLICT,
                    format!(
                        "snapshot {:?} has {clones} clone(s); delete them first",
                        d.name
                    ),
                ));
            }
            out.delete(skey.clone());
            // Free what no remaining view (live vdisk, other snapshots) sees.
            let Some((_, vd)) = vdisk_by_id(view, &d.vdisk_id)? else {
                return Ok(CommandResult::default());
            };
            let mut views: Vec<u64> = view
                .scan(&snapshot_prefix(&d.vdisk_id))?
                .into_iter()
                .filter(|(k, _)| *k != skey)
                .filter_map(|(_, v)| Record::<SnapshotRecord>::decode(&v).ok())
                .map(|s| s.msg.generation)
                .collect();
            views.push(vd.msg.generation);
            let mut by_vblock: BTreeMap<u64, Vec<(Vec<u8>, VblockMapping)>> = BTreeMap::new();
            for (k, v) in view.scan(&mapping_prefix(&d.vdisk_id))? {
                let m = Record::<VblockMapping>::decode(&v)?.msg;
                by_vblock.entry(m.vblock).or_default().push((k, m));
            }
            let mut freed = Vec::new();
            for (_, maps) in by_vblock {
                for (k, m) in &maps {
                    let visible = views.iter().any(|&g| {
                        maps.iter()
                            .filter(|(_, x)| x.generation <= g)
                            .map(|(_, x)| x.generation)
                            .max()
                            == Some(m.generation)
                    });
                    if !visible {
                        out.delete(k.clone());
                        out.delete(group_key(m.extent_group_id));
                        freed.push(m.extent_group_id);
                    }
                }
            }
            CommandResult {
                allocated_id: freed.len() as u64,
                ..Default::default()
            }
        }
        Op::CloneVdisk(c) => {
            if let Err(e) = validate_name("vdisk", &c.name) {
                return Ok(fail(codes::INVALID, e));
            }
            let Some(sbytes) = view.get(&snapshot_key(&c.snapshot_vdisk_id, &c.snapshot_name))?
            else {
                return Ok(fail(
                    codes::NOT_FOUND,
                    format!("snapshot {:?} not found", c.snapshot_name),
                ));
            };
            let snap = Record::<SnapshotRecord>::decode(&sbytes)?;
            let Some((_, parent)) = vdisk_by_id(view, &c.snapshot_vdisk_id)? else {
                return Ok(fail(codes::NOT_FOUND, "parent vdisk not found"));
            };
            let ds_name = if c.datastore.is_empty() {
                // Same datastore as the parent.
                let mut found = None;
                for (_, v) in view.scan(PREFIX_DATASTORE)? {
                    let d = Record::<DatastoreRecord>::decode(&v)?;
                    if d.msg.id == parent.msg.datastore_id {
                        found = Some(d.msg.name.clone());
                    }
                }
                found.unwrap_or_default()
            } else {
                c.datastore.clone()
            };
            let Some(ds_bytes) = view.get(&datastore_key(&ds_name))? else {
                return Ok(fail(
                    codes::NOT_FOUND,
                    format!("datastore {ds_name:?} not found"),
                ));
            };
            let ds = Record::<DatastoreRecord>::decode(&ds_bytes)?;
            let key = vdisk_key(&ds_name, &c.name);
            if view.get(&key)?.is_some() {
                return Ok(fail(
                    codes::CONFLICT,
                    format!("vdisk {:?} already exists", c.name),
                ));
            }
            let owner = if c.owner_node_id == 0 {
                parent.msg.owner_node_id
            } else {
                c.owner_node_id
            };
            let rec = VdiskRecord {
                format_version: cairn_api::FORMAT_VERSION,
                id: c.id.clone(),
                name: c.name.clone(),
                datastore_id: ds.msg.id.clone(),
                size_bytes: parent.msg.size_bytes,
                owner_node_id: owner,
                created_unix_ms: now,
                owner_epoch: 1,
                generation: 0,
                parent_vdisk_id: c.snapshot_vdisk_id.clone(),
                parent_generation: snap.msg.generation,
                // A clone is a new device: no reservations carry over.
                frontend_state: Default::default(),
            };
            let bytes = rec.encode_to_vec();
            out.put(vdisk_id_key(&c.id), key.clone());
            out.put(key, bytes.clone());
            ok_record(bytes)
        }
        Op::SetVdiskOwner(o) => {
            let Some((vkey, mut vd)) = vdisk_by_id(view, &o.vdisk_id)? else {
                return Ok(vdisk_not_found(&o.vdisk_id));
            };
            if vd.msg.owner_epoch != o.expect_owner_epoch {
                return Ok(fail(
                    codes::CONFLICT,
                    format!(
                        "vdisk {} owner epoch is {}, not {}",
                        o.vdisk_id, vd.msg.owner_epoch, o.expect_owner_epoch
                    ),
                ));
            }
            if view.get(&node_key(o.owner_node_id))?.is_none() {
                return Ok(fail(
                    codes::INVALID,
                    format!("node {} is not a member", o.owner_node_id),
                ));
            }
            vd.msg.owner_node_id = o.owner_node_id;
            vd.msg.owner_epoch += 1;
            let bytes = vd.encode();
            out.put(vkey, bytes.clone());
            ok_record(bytes)
        }
        Op::SetVdiskFrontendState(f) => {
            let Some((vkey, mut vd)) = vdisk_by_id(view, &f.vdisk_id)? else {
                return Ok(vdisk_not_found(&f.vdisk_id));
            };
            if vd.msg.owner_node_id != f.owner_node_id || vd.msg.owner_epoch != f.owner_epoch {
                return Ok(fail(
                    codes::CONFLICT,
                    format!(
                        "vdisk {} is owned by node {} at owner epoch {}, not node {} at {}",
                        f.vdisk_id,
                        vd.msg.owner_node_id,
                        vd.msg.owner_epoch,
                        f.owner_node_id,
                        f.owner_epoch
                    ),
                ));
            }
            if f.key.is_empty() || f.key.len() > 64 || f.value.len() > MAX_FRONTEND_STATE {
                return Ok(fail(
                    codes::INVALID,
                    format!(
                        "front-end state key {:?} ({} bytes) is empty, too long or too large",
                        f.key,
                        f.value.len()
                    ),
                ));
            }
            if f.value.is_empty() {
                vd.msg.frontend_state.remove(&f.key);
            } else {
                vd.msg.frontend_state.insert(f.key.clone(), f.value.clone());
            }
            let bytes = vd.encode();
            out.put(vkey, bytes.clone());
            ok_record(bytes)
        }
        Op::CreateIscsiTarget(c) => crate::iscsi::create(view, out, c, now)?,
        Op::DeleteIscsiTarget(d) => crate::iscsi::delete(view, out, d)?,
        Op::MapIscsiLun(m) => crate::iscsi::map_lun(view, out, m)?,
        Op::UnmapIscsiLun(u) => crate::iscsi::unmap_lun(view, out, u)?,
        Op::SetNodeVersion(s) => {
            let key = node_key(s.node_id);
            let Some(bytes) = view.get(&key)? else {
                return Ok(fail(
                    codes::NOT_FOUND,
                    format!("node {} not found", s.node_id),
                ));
            };
            let mut rec = Record::<NodeRecord>::decode(&bytes)?;
            rec.msg.version = s.version.clone();
            out.put(key, rec.encode());
            CommandResult::default()
        }
    })
}

/// Records a membership change in the nodes table.
pub fn apply_membership(
    view: &dyn StateView,
    out: &mut Overlay,
    node: &NodeRecord,
    role: NodeRole,
    now: u64,
) -> Result<(), MetaError> {
    let key = node_key(node.id);
    let mut rec = match view.get(&key)? {
        Some(bytes) => Record::<NodeRecord>::decode(&bytes)?,
        None => Record::new(NodeRecord {
            format_version: cairn_api::FORMAT_VERSION,
            id: node.id,
            added_unix_ms: now,
            ..Default::default()
        }),
    };
    if !node.rpc_addr.is_empty() {
        rec.msg.rpc_addr = node.rpc_addr.clone();
    }
    if !node.api_addr.is_empty() {
        rec.msg.api_addr = node.api_addr.clone();
    }
    if !node.version.is_empty() {
        rec.msg.version = node.version.clone();
    }
    if !node.iscsi_addr.is_empty() {
        rec.msg.iscsi_addr = node.iscsi_addr.clone();
    }
    rec.msg.role = role as i32;
    out.put(key, rec.encode());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_api::metadata::v1::{CreateDatastore, CreateVdisk, InitCluster, ResizeVdisk};

    fn run(state: &mut BTreeMap<Vec<u8>, Vec<u8>>, op: Op) -> CommandResult {
        let cmd = Command {
            origin_node: 1,
            proposed_unix_ms: 42,
            op: Some(op),
            ..Default::default()
        };
        let mut ov = Overlay::default();
        let res = match apply(state, &mut ov, &cmd) {
            Ok(r) => r,
            Err(e) => panic!("engine error {e}"),
        };
        for (k, v) in ov.writes {
            match v {
                Some(v) => state.insert(k, v),
                None => state.remove(&k),
            };
        }
        res
    }

    fn init() -> BTreeMap<Vec<u8>, Vec<u8>> {
        let mut s = BTreeMap::new();
        let r = run(
            &mut s,
            Op::InitCluster(InitCluster {
                cluster: Some(ClusterRecord {
                    cluster_id: "c".into(),
                    ..Default::default()
                }),
                first_node: Some(NodeRecord {
                    id: 1,
                    ..Default::default()
                }),
            }),
        );
        assert_eq!(r.error_code, "");
        s
    }

    #[test]
    fn duplicate_datastore_is_a_conflict_and_changes_nothing() {
        let mut s = init();
        let create = |id: &str| {
            Op::CreateDatastore(CreateDatastore {
                name: "gold".into(),
                replication_factor: 2,
                id: id.into(),
                ..Default::default()
            })
        };
        assert_eq!(run(&mut s, create("a")).error_code, "");
        let before = s.clone();
        let r = run(&mut s, create("b"));
        assert_eq!(r.error_code, codes::CONFLICT.code);
        assert_eq!(s, before);
    }

    #[test]
    fn vdisk_rules() {
        let mut s = init();
        run(
            &mut s,
            Op::CreateDatastore(CreateDatastore {
                name: "ds".into(),
                replication_factor: 1,
                ..Default::default()
            }),
        );
        let mk = |size| {
            Op::CreateVdisk(CreateVdisk {
                datastore: "ds".into(),
                name: "v".into(),
                size_bytes: size,
                ..Default::default()
            })
        };
        assert_eq!(run(&mut s, mk(1000)).error_code, codes::INVALID.code);
        assert_eq!(run(&mut s, mk(1 << 30)).error_code, "");
        assert_eq!(run(&mut s, mk(1 << 30)).error_code, codes::CONFLICT.code);
        let shrink = Op::ResizeVdisk(ResizeVdisk {
            datastore: "ds".into(),
            name: "v".into(),
            size_bytes: 1 << 20,
        });
        assert_eq!(run(&mut s, shrink).error_code, codes::CONFLICT.code);
        let grow = Op::ResizeVdisk(ResizeVdisk {
            datastore: "ds".into(),
            name: "v".into(),
            size_bytes: 2 << 30,
        });
        assert_eq!(run(&mut s, grow).error_code, "");
        let del =
            Op::DeleteDatastore(cairn_api::metadata::v1::DeleteDatastore { name: "ds".into() });
        assert_eq!(
            run(&mut s, del).error_code,
            codes::CONFLICT.code,
            "non-empty datastore"
        );
    }

    #[test]
    fn iscsi_target_rules() {
        use cairn_api::metadata::v1::{
            CreateIscsiTarget, DeleteIscsiTarget, DeleteVdisk, IscsiLun, IscsiTargetRecord,
            MapIscsiLun, UnmapIscsiLun,
        };
        let mut s = init();
        run(
            &mut s,
            Op::CreateDatastore(CreateDatastore {
                name: "ds".into(),
                replication_factor: 1,
                ..Default::default()
            }),
        );
        for (name, id) in [("a", "vd-a"), ("b", "vd-b")] {
            let r = run(
                &mut s,
                Op::CreateVdisk(CreateVdisk {
                    datastore: "ds".into(),
                    name: name.into(),
                    size_bytes: 1 << 30,
                    id: id.into(),
                    ..Default::default()
                }),
            );
            assert_eq!(r.error_code, "");
        }
        let lun = |lun, vdisk: &str| IscsiLun {
            lun,
            vdisk_id: vdisk.into(),
        };
        let target = |iqn: &str, luns: Vec<IscsiLun>| {
            Op::CreateIscsiTarget(CreateIscsiTarget {
                target: Some(IscsiTargetRecord {
                    iqn: iqn.into(),
                    luns,
                    chap_user: "host".into(),
                    chap_secret: "twelve-bytes".into(),
                    ..Default::default()
                }),
            })
        };
        let iqn = "iqn.2026-11.io.cairn:t";
        let code = |s: &mut BTreeMap<Vec<u8>, Vec<u8>>, op| run(s, op).error_code;
        assert_eq!(code(&mut s, target("bad", vec![])), codes::INVALID.code);
        assert_eq!(
            code(&mut s, target(iqn, vec![lun(0, "nope")])),
            codes::INVALID.code
        );
        assert_eq!(
            code(&mut s, target(iqn, vec![lun(0, "vd-a"), lun(0, "vd-b")])),
            codes::CONFLICT.code
        );
        assert_eq!(
            code(&mut s, target(iqn, vec![lun(0, "vd-a"), lun(1, "vd-a")])),
            codes::CONFLICT.code
        );
        assert_eq!(
            code(&mut s, target(iqn, vec![lun(256, "vd-a")])),
            codes::INVALID.code
        );
        let before = s.clone();
        assert_eq!(code(&mut s, target(iqn, vec![lun(0, "vd-a")])), "");
        assert_ne!(s, before);
        assert_eq!(
            code(&mut s, target(iqn, vec![lun(0, "vd-b")])),
            codes::CONFLICT.code
        );
        let map = |l| {
            Op::MapIscsiLun(MapIscsiLun {
                iqn: iqn.into(),
                lun: Some(l),
            })
        };
        assert_eq!(code(&mut s, map(lun(0, "vd-b"))), codes::CONFLICT.code);
        assert_eq!(code(&mut s, map(lun(1, "vd-b"))), "");
        let del_vdisk = Op::DeleteVdisk(DeleteVdisk {
            datastore: "ds".into(),
            name: "b".into(),
        });
        let r = run(&mut s, del_vdisk.clone());
        assert_eq!(r.error_code, codes::CONFLICT.code);
        assert!(r.error_message.contains("LUN 1"), "{}", r.error_message);
        let unmap = |l| {
            Op::UnmapIscsiLun(UnmapIscsiLun {
                iqn: iqn.into(),
                lun: l,
            })
        };
        assert_eq!(code(&mut s, unmap(7)), codes::NOT_FOUND.code);
        assert_eq!(code(&mut s, unmap(1)), "");
        assert_eq!(code(&mut s, del_vdisk), "");
        let del = || Op::DeleteIscsiTarget(DeleteIscsiTarget { iqn: iqn.into() });
        assert_eq!(code(&mut s, del()), "");
        assert_eq!(code(&mut s, del()), codes::NOT_FOUND.code);
    }

    #[test]
    fn unknown_op_from_newer_version_applies_nothing() {
        let mut s = init();
        let before = s.clone();
        let cmd = Command {
            origin_node: 1,
            op: None,
            ..Default::default()
        };
        let mut ov = Overlay::default();
        let r = apply(&s, &mut ov, &cmd).map_err(|e| e.to_string());
        assert!(matches!(r, Ok(ref r) if r.error_code == codes::INVALID.code));
        assert!(ov.writes.is_empty());
        s.retain(|_, _| true);
        assert_eq!(s, before);
    }

    #[test]
    fn layered_scan_sees_batch_writes() -> Result<(), MetaError> {
        let mut base = BTreeMap::new();
        base.insert(b"k/a".to_vec(), b"1".to_vec());
        base.insert(b"k/b".to_vec(), b"2".to_vec());
        let mut ov = Overlay::default();
        ov.delete(b"k/a".to_vec());
        ov.put(b"k/c".to_vec(), b"3".to_vec());
        let l = Layered {
            base: &base,
            overlay: &ov,
        };
        let keys: Vec<_> = l.scan(b"k/")?.into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, vec![b"k/b".to_vec(), b"k/c".to_vec()]);
        Ok(())
    }
}
