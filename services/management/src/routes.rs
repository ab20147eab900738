//! REST routes. Reads are linearizable (a ReadIndex barrier first), writes are
//! raft proposals; both may be sent to any node.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use cairn_api::metadata::v1::command::Op;
use cairn_api::metadata::v1::{
    AllocateNodeId, CloneVdisk, CreateDatastore, CreateSnapshot, CreateVdisk, DatastoreRecord,
    DeleteDatastore, DeleteKv, DeleteSnapshot, DeleteVdisk, NodeMaintenance, NodeRecord, NodeRole,
    PutKv, ResizeVdisk, SnapshotRecord, TaskRecord, TaskState, TieringPolicy, VdiskRecord,
};
use cairn_metadata::MetadataHandle;
use cairn_rpc::pki::TlsPaths;
use cairn_util::error_code::codes;
use serde::{Deserialize, Serialize};

use crate::problem::{ApiJson, Problem};

/// What every handler needs.
#[derive(Clone)]
pub struct ApiState {
    pub meta: MetadataHandle,
    /// Hex SHA-256 of the admin bearer token.
    pub token_sha256: Arc<str>,
    pub tls: TlsPaths,
    pub version: Arc<str>,
    /// This node's service counters (data service: repairs, bytes, disks).
    pub node_stats: Arc<dyn Fn() -> serde_json::Value + Send + Sync>,
}

pub(crate) type ApiResult<T> = Result<T, Problem>;

/// The REST router (serve it with `cairn_rpc::serve::serve_tls`).
pub fn router(state: ApiState) -> Router {
    let authed = Router::new()
        .route("/v1/openapi.yaml", get(openapi))
        .route("/v1/cluster", get(cluster_status))
        .route("/v1/cluster/members", post(add_member))
        .route(
            "/v1/cluster/members/:id",
            axum::routing::delete(remove_member),
        )
        .route("/v1/nodes", get(list_nodes).post(prepare_node))
        .route(
            "/v1/nodes/:id/maintenance",
            axum::routing::put(start_maintenance).delete(end_maintenance),
        )
        .route(
            "/v1/datastores",
            get(list_datastores).post(create_datastore),
        )
        .route(
            "/v1/datastores/:ds",
            get(get_datastore).delete(delete_datastore),
        )
        .route(
            "/v1/datastores/:ds/vdisks",
            get(list_vdisks).post(create_vdisk),
        )
        .route(
            "/v1/datastores/:ds/vdisks/:name",
            get(get_vdisk).delete(delete_vdisk),
        )
        .route("/v1/datastores/:ds/vdisks/:name/resize", post(resize_vdisk))
        .route(
            "/v1/datastores/:ds/vdisks/:name/snapshots",
            get(list_snapshots).post(create_snapshot),
        )
        .route(
            "/v1/datastores/:ds/vdisks/:name/snapshots/:snap",
            axum::routing::delete(delete_snapshot),
        )
        .route(
            "/v1/datastores/:ds/vdisks/:name/snapshots/:snap/clone",
            post(clone_snapshot),
        )
        .route("/v1/tasks", get(list_tasks))
        .route("/v1/node/stats", get(node_stats))
        .route("/v1/tasks/:id", get(get_task))
        .merge(crate::iscsi::routes())
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ));
    Router::new()
        .route("/v1/health", get(health))
        .merge(authed)
        .fallback(not_found)
        .with_state(state)
}

async fn require_token(State(st): State<ApiState>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let ok = presented.is_some_and(|t| {
        cairn_util::constant_time_eq(
            cairn_util::sha256_hex(t.as_bytes()).as_bytes(),
            st.token_sha256.as_bytes(),
        )
    });
    if !ok {
        tracing::info!(path = %req.uri().path(), "refused request without a valid bearer token");
        return Problem::from_code(
            codes::UNAUTHORIZED,
            "a valid bearer token is required (Authorization: Bearer <token>)",
        )
        .into_response();
    }
    next.run(req).await
}

async fn not_found(req: Request) -> Problem {
    Problem::from_code(
        codes::NOT_FOUND,
        format!("no such endpoint: {} {}", req.method(), req.uri().path()),
    )
}

async fn health(State(st): State<ApiState>) -> Json<serde_json::Value> {
    Json(
        serde_json::json!({ "status": "ok", "node_id": st.meta.node_id(), "version": &*st.version }),
    )
}

async fn openapi() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/yaml")],
        cairn_api::OPENAPI_YAML,
    )
}

// ---- JSON shapes ----

#[derive(Serialize)]
struct NodeJson {
    id: u64,
    rpc_addr: String,
    api_addr: String,
    /// Empty for a node that has not reported its iSCSI portal.
    iscsi_addr: String,
    role: &'static str,
    version: String,
    /// Present while the node is announced as away for maintenance.
    #[serde(skip_serializing_if = "Option::is_none")]
    maintenance: Option<MaintenanceJson>,
}

#[derive(Serialize)]
struct MaintenanceJson {
    started_unix_ms: u64,
    until_unix_ms: u64,
    reason: String,
    /// The task that shows the vdisks' ownership moving off the node.
    drain_task: String,
}

impl NodeJson {
    /// `marks`: every maintenance mark; only an unexpired one of this node shows.
    fn with_marks(n: NodeRecord, marks: &[NodeMaintenance], now_ms: u64) -> Self {
        let mut j = Self::from(n);
        j.maintenance = marks
            .iter()
            .find(|m| m.node_id == j.id && m.until_unix_ms > now_ms)
            .map(|m| MaintenanceJson {
                started_unix_ms: m.started_unix_ms,
                until_unix_ms: m.until_unix_ms,
                reason: m.reason.clone(),
                drain_task: cairn_metadata::handle::drain_task_id(m.node_id, m.started_unix_ms),
            });
        j
    }
}

fn role_name(role: i32) -> &'static str {
    match NodeRole::try_from(role) {
        Ok(NodeRole::Voter) => "voter",
        Ok(NodeRole::Learner) => "learner",
        Ok(NodeRole::Removed) => "removed",
        _ => "unknown",
    }
}

impl From<NodeRecord> for NodeJson {
    fn from(n: NodeRecord) -> Self {
        Self {
            id: n.id,
            rpc_addr: n.rpc_addr,
            api_addr: n.api_addr,
            iscsi_addr: n.iscsi_addr,
            role: role_name(n.role),
            version: n.version,
            maintenance: None,
        }
    }
}

#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TieringJson {
    #[serde(default)]
    enabled: bool,
    #[serde(default)]
    cold_after_secs: u64,
    #[serde(default)]
    target: String,
}

#[derive(Serialize)]
struct DatastoreJson {
    id: String,
    name: String,
    replication_factor: u32,
    compression: bool,
    tiering: TieringJson,
    created_unix_ms: u64,
}

impl From<DatastoreRecord> for DatastoreJson {
    fn from(d: DatastoreRecord) -> Self {
        let t = d.tiering.unwrap_or_default();
        Self {
            id: d.id,
            name: d.name,
            replication_factor: d.replication_factor,
            compression: d.compression,
            tiering: TieringJson {
                enabled: t.enabled,
                cold_after_secs: t.cold_after_secs,
                target: t.target,
            },
            created_unix_ms: d.created_unix_ms,
        }
    }
}

#[derive(Serialize)]
struct VdiskJson {
    id: String,
    name: String,
    /// Datastore name (the record holds the datastore's id).
    datastore: String,
    datastore_id: String,
    size_bytes: u64,
    owner_node_id: u64,
    owner_epoch: u64,
    created_unix_ms: u64,
}

impl VdiskJson {
    fn new(v: VdiskRecord, datastore: &str) -> Self {
        Self {
            id: v.id,
            name: v.name,
            datastore: datastore.to_string(),
            datastore_id: v.datastore_id,
            size_bytes: v.size_bytes,
            owner_node_id: v.owner_node_id,
            owner_epoch: v.owner_epoch,
            created_unix_ms: v.created_unix_ms,
        }
    }
}

pub(crate) fn decode<M: prost::Message + Default>(bytes: &[u8]) -> ApiResult<M> {
    M::decode(bytes)
        .map_err(|e| Problem::from_code(codes::INTERNAL, format!("undecodable record: {e}")))
}

pub(crate) fn missing(what: &str) -> Problem {
    Problem::from_code(codes::NOT_FOUND, format!("{what} not found"))
}

// ---- cluster and nodes ----

/// This node's view, without a read barrier: status must answer during an
/// outage too, when no quorum can confirm anything.
async fn cluster_status(State(st): State<ApiState>) -> ApiResult<Json<serde_json::Value>> {
    let status = st.meta.status().await?;
    let cluster = st.meta.cluster()?.unwrap_or_default();
    let nodes: Vec<NodeJson> = st.meta.nodes()?.into_iter().map(Into::into).collect();
    Ok(Json(serde_json::json!({
        "cluster_id": cluster.cluster_id,
        "name": cluster.name,
        "node_id": status.node_id,
        "role": status.role,
        "leader_id": status.leader_id,
        "term": status.term,
        "commit_index": status.commit_index,
        "applied_index": status.applied_index,
        "first_index": status.first_index,
        "last_index": status.last_index,
        "voters": status.voters,
        "learners": status.learners,
        "nodes": nodes,
        "version": &*st.version,
    })))
}

async fn list_nodes(State(st): State<ApiState>) -> ApiResult<Json<Vec<NodeJson>>> {
    st.meta.read_barrier().await?;
    let marks = st.meta.maintenance()?;
    let now = cairn_util::now_unix_ms();
    Ok(Json(
        st.meta
            .nodes()?
            .into_iter()
            .map(|n| NodeJson::with_marks(n, &marks, now))
            .collect(),
    ))
}

/// Longest maintenance one request may announce: a mark always ends by
/// itself, so a forgotten one cannot keep groups short of a replica for good.
const MAX_MAINTENANCE_SECS: u64 = 7 * 86_400;
const MAX_MAINTENANCE_REASON: usize = 256;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StartMaintenance {
    duration_secs: u64,
    #[serde(default)]
    reason: String,
}

/// A member node (not removed) by the id in a path.
fn member(st: &ApiState, id: &str) -> ApiResult<NodeRecord> {
    let n: u64 = id.parse().map_err(|_| {
        Problem::from_code(codes::INVALID, format!("node id {id:?} is not a number"))
    })?;
    st.meta
        .node(n)?
        .filter(|r| r.role != NodeRole::Removed as i32)
        .ok_or_else(|| missing(&format!("node {n}")))
}

/// Announces that a node will be away (an upgrade, a reboot): until the
/// mark ends, groups that lose a replica on it wait for it instead of
/// being rebuilt elsewhere after the node's `rebuild_wait_secs`, and the
/// data service drains it (`cairn_data::drain`: its vdisks' ownership
/// moves to other nodes, shown by the `drain_task`). Starting it again
/// replaces the mark (extends or shortens it).
async fn start_maintenance(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<StartMaintenance>,
) -> ApiResult<Json<NodeJson>> {
    if !(1..=MAX_MAINTENANCE_SECS).contains(&body.duration_secs) {
        return Err(Problem::from_code(
            codes::INVALID,
            format!(
                "duration_secs {} out of range: from 1 to {MAX_MAINTENANCE_SECS} (7 days)",
                body.duration_secs
            ),
        ));
    }
    if body.reason.len() > MAX_MAINTENANCE_REASON || body.reason.chars().any(char::is_control) {
        return Err(Problem::from_code(
            codes::INVALID,
            format!("reason must be at most {MAX_MAINTENANCE_REASON} bytes of printable text"),
        ));
    }
    st.meta.read_barrier().await?;
    let node = member(&st, &id)?;
    let now = cairn_util::now_unix_ms();
    let mark = NodeMaintenance {
        format_version: cairn_api::FORMAT_VERSION,
        node_id: node.id,
        started_unix_ms: now,
        until_unix_ms: now.saturating_add(body.duration_secs.saturating_mul(1000)),
        reason: body.reason,
    };
    st.meta
        .propose(Op::PutKv(PutKv {
            key: cairn_metadata::handle::maintenance_key(node.id),
            value: prost::Message::encode_to_vec(&mark),
        }))
        .await?;
    tracing::info!(node = node.id, duration_secs = body.duration_secs, reason = %mark.reason,
        "node maintenance started: its vdisks move to other nodes, its groups wait for it \
         until the mark ends");
    Ok(Json(NodeJson::with_marks(node, &[mark], now)))
}

/// Ends a node's maintenance mark: groups still waiting for it wait only
/// the node's `rebuild_wait_secs` from when they lost the replica.
async fn end_maintenance(
    State(st): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult<Json<NodeJson>> {
    st.meta.read_barrier().await?;
    let node = member(&st, &id)?;
    st.meta
        .propose(Op::DeleteKv(DeleteKv {
            key: cairn_metadata::handle::maintenance_key(node.id),
        }))
        .await?;
    tracing::info!(node = node.id, "node maintenance ended");
    Ok(Json(NodeJson::from(node)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PrepareNode {
    rpc_addr: String,
    api_addr: String,
}

fn parse_addr(what: &str, a: &str) -> ApiResult<SocketAddr> {
    a.parse::<SocketAddr>().map_err(|_| {
        Problem::from_code(
            codes::INVALID,
            format!("{what} {a:?} is not an IP:port address"),
        )
    })
}

/// Allocates a node id and issues the new node's certificate.
async fn prepare_node(
    State(st): State<ApiState>,
    ApiJson(body): ApiJson<PrepareNode>,
) -> ApiResult<Response> {
    let rpc = parse_addr("rpc_addr", &body.rpc_addr)?;
    let api = parse_addr("api_addr", &body.api_addr)?;
    // Load the CA first: a node that cannot issue certificates must not use up a node id.
    let ca = st.tls.load_ca().map_err(|e| {
        Problem::from_code(
            codes::INTERNAL,
            format!("this node cannot issue certificates: {e}"),
        )
    })?;
    let res = st
        .meta
        .propose(Op::AllocateNodeId(AllocateNodeId {}))
        .await?;
    let id = ca
        .issue_node(res.allocated_id, &[rpc.ip(), api.ip()])
        .map_err(|e| {
            Problem::from_code(codes::INTERNAL, format!("certificate issue failed: {e}"))
        })?;
    let cluster = st.meta.cluster()?.unwrap_or_default();
    tracing::info!(node = res.allocated_id, rpc_addr = %rpc, "issued identity for a joining node");
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({
            "node_id": res.allocated_id,
            "cluster_id": cluster.cluster_id,
            "ca_pem": ca.cert_pem,
            "ca_key_pem": ca.key_pem,
            "cert_pem": id.cert_pem,
            "key_pem": id.key_pem,
        })),
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddMember {
    node_id: u64,
    rpc_addr: String,
    api_addr: String,
    #[serde(default)]
    version: String,
    /// The node's iSCSI portal (absent from nodes older than issue 5).
    #[serde(default)]
    iscsi_addr: String,
}

async fn add_member(
    State(st): State<ApiState>,
    ApiJson(body): ApiJson<AddMember>,
) -> ApiResult<Json<serde_json::Value>> {
    parse_addr("rpc_addr", &body.rpc_addr)?;
    parse_addr("api_addr", &body.api_addr)?;
    if !body.iscsi_addr.is_empty() {
        parse_addr("iscsi_addr", &body.iscsi_addr)?;
    }
    if body.node_id == 0 {
        return Err(Problem::from_code(
            codes::INVALID,
            "node_id must be positive",
        ));
    }
    let node = NodeRecord {
        format_version: cairn_api::FORMAT_VERSION,
        id: body.node_id,
        rpc_addr: body.rpc_addr,
        api_addr: body.api_addr,
        version: body.version,
        iscsi_addr: body.iscsi_addr,
        ..Default::default()
    };
    st.meta.add_member(node, Duration::from_secs(120)).await?;
    let status = st.meta.status().await?;
    Ok(Json(
        serde_json::json!({ "node_id": body.node_id, "voters": status.voters, "learners": status.learners }),
    ))
}

async fn remove_member(State(st): State<ApiState>, Path(id): Path<u64>) -> ApiResult<StatusCode> {
    st.meta.read_barrier().await?;
    st.meta.remove_member(id).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---- datastores ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewDatastore {
    name: String,
    #[serde(default = "default_rf")]
    replication_factor: u32,
    #[serde(default)]
    compression: bool,
    #[serde(default)]
    tiering: TieringJson,
}

fn default_rf() -> u32 {
    2
}

async fn list_datastores(State(st): State<ApiState>) -> ApiResult<Json<Vec<DatastoreJson>>> {
    st.meta.read_barrier().await?;
    Ok(Json(
        st.meta.datastores()?.into_iter().map(Into::into).collect(),
    ))
}

async fn get_datastore(
    State(st): State<ApiState>,
    Path(ds): Path<String>,
) -> ApiResult<Json<DatastoreJson>> {
    st.meta.read_barrier().await?;
    let d = st
        .meta
        .datastore(&ds)?
        .ok_or_else(|| missing(&format!("datastore {ds:?}")))?;
    Ok(Json(d.into()))
}

async fn create_datastore(
    State(st): State<ApiState>,
    ApiJson(b): ApiJson<NewDatastore>,
) -> ApiResult<Response> {
    let res = st
        .meta
        .propose(Op::CreateDatastore(CreateDatastore {
            name: b.name,
            replication_factor: b.replication_factor,
            compression: b.compression,
            tiering: Some(TieringPolicy {
                enabled: b.tiering.enabled,
                cold_after_secs: b.tiering.cold_after_secs,
                target: b.tiering.target,
            }),
            id: uuid_v4(),
        }))
        .await?;
    let d: DatastoreRecord = decode(&res.record)?;
    Ok((StatusCode::CREATED, Json(DatastoreJson::from(d))).into_response())
}

async fn delete_datastore(
    State(st): State<ApiState>,
    Path(ds): Path<String>,
) -> ApiResult<StatusCode> {
    st.meta
        .propose(Op::DeleteDatastore(DeleteDatastore { name: ds }))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---- vdisks ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewVdisk {
    name: String,
    size_bytes: u64,
    #[serde(default)]
    owner_node_id: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Resize {
    size_bytes: u64,
}

async fn list_vdisks(
    State(st): State<ApiState>,
    Path(ds): Path<String>,
) -> ApiResult<Json<Vec<VdiskJson>>> {
    st.meta.read_barrier().await?;
    if st.meta.datastore(&ds)?.is_none() {
        return Err(missing(&format!("datastore {ds:?}")));
    }
    Ok(Json(
        st.meta
            .vdisks(&ds)?
            .into_iter()
            .map(|v| VdiskJson::new(v, &ds))
            .collect(),
    ))
}

async fn get_vdisk(
    State(st): State<ApiState>,
    Path((ds, name)): Path<(String, String)>,
) -> ApiResult<Json<VdiskJson>> {
    st.meta.read_barrier().await?;
    let v = st
        .meta
        .vdisk(&ds, &name)?
        .ok_or_else(|| missing(&format!("vdisk {name:?} in datastore {ds:?}")))?;
    Ok(Json(VdiskJson::new(v, &ds)))
}

async fn create_vdisk(
    State(st): State<ApiState>,
    Path(ds): Path<String>,
    ApiJson(b): ApiJson<NewVdisk>,
) -> ApiResult<Response> {
    let res = st
        .meta
        .propose(Op::CreateVdisk(CreateVdisk {
            datastore: ds.clone(),
            name: b.name,
            size_bytes: b.size_bytes,
            owner_node_id: b.owner_node_id,
            id: uuid_v4(),
        }))
        .await?;
    let v: VdiskRecord = decode(&res.record)?;
    Ok((StatusCode::CREATED, Json(VdiskJson::new(v, &ds))).into_response())
}

async fn delete_vdisk(
    State(st): State<ApiState>,
    Path((ds, name)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    st.meta
        .propose(Op::DeleteVdisk(DeleteVdisk {
            datastore: ds,
            name,
        }))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn resize_vdisk(
    State(st): State<ApiState>,
    Path((ds, name)): Path<(String, String)>,
    ApiJson(b): ApiJson<Resize>,
) -> ApiResult<Json<VdiskJson>> {
    let res = st
        .meta
        .propose(Op::ResizeVdisk(ResizeVdisk {
            datastore: ds.clone(),
            name,
            size_bytes: b.size_bytes,
        }))
        .await?;
    let v: VdiskRecord = decode(&res.record)?;
    Ok(Json(VdiskJson::new(v, &ds)))
}

#[derive(Serialize)]
struct SnapshotJson {
    id: String,
    name: String,
    vdisk_id: String,
    generation: u64,
    created_unix_ms: u64,
}

impl From<SnapshotRecord> for SnapshotJson {
    fn from(s: SnapshotRecord) -> Self {
        Self {
            id: s.id,
            name: s.name,
            vdisk_id: s.vdisk_id,
            generation: s.generation,
            created_unix_ms: s.created_unix_ms,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewSnapshot {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewClone {
    name: String,
    #[serde(default)]
    datastore: Option<String>,
    #[serde(default)]
    owner_node_id: u64,
}

fn vdisk_or_404(st: &ApiState, ds: &str, name: &str) -> ApiResult<VdiskRecord> {
    st.meta
        .vdisk(ds, name)?
        .ok_or_else(|| missing(&format!("vdisk {name:?} in datastore {ds:?}")))
}

async fn list_snapshots(
    State(st): State<ApiState>,
    Path((ds, name)): Path<(String, String)>,
) -> ApiResult<Json<Vec<SnapshotJson>>> {
    st.meta.read_barrier().await?;
    let v = vdisk_or_404(&st, &ds, &name)?;
    Ok(Json(
        st.meta
            .snapshots(&v.id)?
            .into_iter()
            .map(Into::into)
            .collect(),
    ))
}

async fn create_snapshot(
    State(st): State<ApiState>,
    Path((ds, name)): Path<(String, String)>,
    ApiJson(b): ApiJson<NewSnapshot>,
) -> ApiResult<Response> {
    st.meta.read_barrier().await?;
    let v = vdisk_or_404(&st, &ds, &name)?;
    let res = st
        .meta
        .propose(Op::CreateSnapshot(CreateSnapshot {
            vdisk_id: v.id,
            name: b.name,
            id: uuid_v4(),
        }))
        .await?;
    let s: SnapshotRecord = decode(&res.record)?;
    Ok((StatusCode::CREATED, Json(SnapshotJson::from(s))).into_response())
}

async fn delete_snapshot(
    State(st): State<ApiState>,
    Path((ds, name, snap)): Path<(String, String, String)>,
) -> ApiResult<StatusCode> {
    st.meta.read_barrier().await?;
    let v = vdisk_or_404(&st, &ds, &name)?;
    st.meta
        .propose(Op::DeleteSnapshot(DeleteSnapshot {
            vdisk_id: v.id,
            name: snap,
        }))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn clone_snapshot(
    State(st): State<ApiState>,
    Path((ds, name, snap)): Path<(String, String, String)>,
    ApiJson(b): ApiJson<NewClone>,
) -> ApiResult<Response> {
    st.meta.read_barrier().await?;
    let v = vdisk_or_404(&st, &ds, &name)?;
    let target_ds = b.datastore.unwrap_or_else(|| ds.clone());
    let res = st
        .meta
        .propose(Op::CloneVdisk(CloneVdisk {
            snapshot_vdisk_id: v.id,
            snapshot_name: snap,
            datastore: target_ds.clone(),
            name: b.name,
            id: uuid_v4(),
            owner_node_id: b.owner_node_id,
        }))
        .await?;
    let c: VdiskRecord = decode(&res.record)?;
    Ok((StatusCode::CREATED, Json(VdiskJson::new(c, &target_ds))).into_response())
}

#[derive(Serialize)]
struct TaskJson {
    id: String,
    kind: String,
    state: &'static str,
    node_id: u64,
    description: String,
    total_bytes: u64,
    done_bytes: u64,
    percent: f64,
    eta_secs: Option<u64>,
    started_unix_ms: u64,
    updated_unix_ms: u64,
    message: String,
}

impl From<TaskRecord> for TaskJson {
    fn from(t: TaskRecord) -> Self {
        let state = match TaskState::try_from(t.state) {
            Ok(TaskState::TaskRunning) => "running",
            Ok(TaskState::TaskDone) => "done",
            Ok(TaskState::TaskFailed) => "failed",
            _ => "unknown",
        };
        let percent = if t.total_bytes == 0 {
            100.0
        } else {
            (t.done_bytes as f64 * 100.0 / t.total_bytes as f64).min(100.0)
        };
        let elapsed = t.updated_unix_ms.saturating_sub(t.started_unix_ms);
        let eta_secs = (state == "running" && t.done_bytes > 0).then(|| {
            let rest = t.total_bytes.saturating_sub(t.done_bytes);
            rest.saturating_mul(elapsed) / t.done_bytes / 1000
        });
        Self {
            id: t.id,
            kind: t.kind,
            state,
            node_id: t.node_id,
            description: t.description,
            total_bytes: t.total_bytes,
            done_bytes: t.done_bytes,
            percent,
            eta_secs,
            started_unix_ms: t.started_unix_ms,
            updated_unix_ms: t.updated_unix_ms,
            message: t.message,
        }
    }
}

async fn node_stats(State(st): State<ApiState>) -> Json<serde_json::Value> {
    Json((st.node_stats)())
}

async fn list_tasks(State(st): State<ApiState>) -> ApiResult<Json<Vec<TaskJson>>> {
    st.meta.read_barrier().await?;
    let mut tasks: Vec<TaskJson> = st.meta.tasks()?.into_iter().map(Into::into).collect();
    tasks.sort_by_key(|t| t.started_unix_ms);
    Ok(Json(tasks))
}

async fn get_task(State(st): State<ApiState>, Path(id): Path<String>) -> ApiResult<Json<TaskJson>> {
    st.meta.read_barrier().await?;
    st.meta
        .tasks()?
        .into_iter()
        .find(|t| t.id == id)
        .map(|t| Json(t.into()))
        .ok_or_else(|| missing(&format!("task {id:?}")))
}

fn uuid_v4() -> String {
    uuid::Uuid::new_v4().to_string()
}
