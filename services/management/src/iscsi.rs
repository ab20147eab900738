//! `/v1/iscsi/targets`: iSCSI targets, their LUNs, CHAP users and initiator
//! allow lists. The rules are the state machine's (`cairn_metadata::iscsi`);
//! this layer resolves vdisk names to ids, normalises iSCSI names, and never
//! lets a CHAP secret out: answers carry `chap: true` and the user name only.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use cairn_api::metadata::v1::command::Op;
use cairn_api::metadata::v1::{
    CreateIscsiTarget, DeleteIscsiTarget, IscsiLun, IscsiTargetRecord, MapIscsiLun, NodeRole,
    UnmapIscsiLun, VdiskRecord,
};
use cairn_metadata::iscsi::normalize_name;
use cairn_util::error_code::codes;
use serde::{Deserialize, Serialize};

use crate::problem::{ApiJson, Problem};
use crate::routes::{decode, missing, ApiResult, ApiState};

pub(crate) fn routes() -> Router<ApiState> {
    Router::new()
        .route("/v1/iscsi/targets", get(list_targets).post(create_target))
        .route(
            "/v1/iscsi/targets/:iqn",
            get(get_target).delete(delete_target),
        )
        .route("/v1/iscsi/targets/:iqn/luns", post(map_lun))
        .route("/v1/iscsi/targets/:iqn/luns/:lun", delete(unmap_lun))
}

#[derive(Serialize)]
struct LunJson {
    lun: u64,
    vdisk_id: String,
    /// Name and datastore of the vdisk (empty if it vanished meanwhile).
    vdisk: String,
    datastore: String,
    size_bytes: u64,
}

/// A target as clients see it: no secrets, only whether CHAP is on.
#[derive(Serialize)]
struct TargetJson {
    iqn: String,
    luns: Vec<LunJson>,
    chap: bool,
    chap_user: String,
    mutual_chap: bool,
    mutual_user: String,
    allowed_initiators: Vec<String>,
    created_unix_ms: u64,
    /// The iSCSI portals of the cluster's nodes: a host may log in to any.
    portals: Vec<String>,
}

fn target_json(st: &ApiState, t: IscsiTargetRecord, portals: &[String]) -> ApiResult<TargetJson> {
    let datastores = st.meta.datastores()?;
    let mut luns = Vec::with_capacity(t.luns.len());
    for l in t.luns {
        let v = st.meta.vdisk_by_id(&l.vdisk_id)?.unwrap_or_default();
        let datastore = datastores
            .iter()
            .find(|d| d.id == v.datastore_id)
            .map(|d| d.name.clone())
            .unwrap_or_default();
        luns.push(LunJson {
            lun: l.lun,
            vdisk_id: l.vdisk_id,
            vdisk: v.name,
            datastore,
            size_bytes: v.size_bytes,
        });
    }
    Ok(TargetJson {
        iqn: t.iqn,
        luns,
        chap: !t.chap_user.is_empty(),
        chap_user: t.chap_user,
        mutual_chap: !t.mutual_user.is_empty(),
        mutual_user: t.mutual_user,
        allowed_initiators: t.allowed_initiators,
        created_unix_ms: t.created_unix_ms,
        portals: portals.to_vec(),
    })
}

fn portals(st: &ApiState) -> ApiResult<Vec<String>> {
    Ok(st
        .meta
        .nodes()?
        .into_iter()
        .filter(|n| n.role != NodeRole::Removed as i32 && !n.iscsi_addr.is_empty())
        .map(|n| n.iscsi_addr)
        .collect())
}

fn invalid(detail: impl Into<String>) -> Problem {
    Problem::from_code(codes::INVALID, detail)
}

/// A vdisk named by its id, `datastore/name`, or a name unique across the
/// datastores. Unknown or ambiguous references are `422`: the body is at
/// fault, not the URL.
fn resolve_vdisk(st: &ApiState, reference: &str) -> ApiResult<VdiskRecord> {
    if let Some(v) = st.meta.vdisk_by_id(reference)? {
        return Ok(v);
    }
    if let Some((ds, name)) = reference.split_once('/') {
        return st
            .meta
            .vdisk(ds, name)?
            .ok_or_else(|| invalid(format!("vdisk {reference:?} does not exist")));
    }
    let mut found: Vec<VdiskRecord> = st
        .meta
        .all_vdisks()?
        .into_iter()
        .filter(|v| v.name == reference)
        .collect();
    match found.len() {
        0 => Err(invalid(format!("vdisk {reference:?} does not exist"))),
        1 => Ok(found.remove(0)),
        n => Err(invalid(format!(
            "vdisk name {reference:?} exists in {n} datastores: use datastore/name or the vdisk id"
        ))),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewLun {
    lun: u64,
    /// Vdisk id, `datastore/name`, or a name unique across datastores.
    vdisk: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewTarget {
    iqn: String,
    #[serde(default)]
    luns: Vec<NewLun>,
    #[serde(default)]
    chap_user: String,
    #[serde(default)]
    chap_secret: String,
    #[serde(default)]
    mutual_user: String,
    #[serde(default)]
    mutual_secret: String,
    #[serde(default)]
    allowed_initiators: Vec<String>,
}

async fn list_targets(State(st): State<ApiState>) -> ApiResult<Json<Vec<TargetJson>>> {
    st.meta.read_barrier().await?;
    let portals = portals(&st)?;
    let targets = st.meta.iscsi_targets()?;
    let mut out = Vec::with_capacity(targets.len());
    for t in targets {
        out.push(target_json(&st, t, &portals)?);
    }
    Ok(Json(out))
}

async fn get_target(
    State(st): State<ApiState>,
    Path(iqn): Path<String>,
) -> ApiResult<Json<TargetJson>> {
    st.meta.read_barrier().await?;
    let iqn = normalize_name(&iqn);
    let t = st
        .meta
        .iscsi_target(&iqn)?
        .ok_or_else(|| missing(&format!("iSCSI target {iqn:?}")))?;
    Ok(Json(target_json(&st, t, &portals(&st)?)?))
}

async fn create_target(
    State(st): State<ApiState>,
    ApiJson(b): ApiJson<NewTarget>,
) -> ApiResult<Response> {
    st.meta.read_barrier().await?;
    let mut luns = Vec::with_capacity(b.luns.len());
    for l in &b.luns {
        luns.push(IscsiLun {
            lun: l.lun,
            vdisk_id: resolve_vdisk(&st, &l.vdisk)?.id,
        });
    }
    let iqn = normalize_name(&b.iqn);
    let res = st
        .meta
        .propose(Op::CreateIscsiTarget(CreateIscsiTarget {
            target: Some(IscsiTargetRecord {
                format_version: cairn_api::FORMAT_VERSION,
                iqn: iqn.clone(),
                luns,
                chap_user: b.chap_user,
                chap_secret: b.chap_secret,
                mutual_user: b.mutual_user,
                mutual_secret: b.mutual_secret,
                allowed_initiators: b
                    .allowed_initiators
                    .iter()
                    .map(|n| normalize_name(n))
                    .collect(),
                created_unix_ms: 0,
            }),
        }))
        .await?;
    let t: IscsiTargetRecord = decode(&res.record)?;
    tracing::info!(iqn = %t.iqn, luns = t.luns.len(), chap = !t.chap_user.is_empty(),
        mutual_chap = !t.mutual_user.is_empty(), "iSCSI target created");
    Ok((
        StatusCode::CREATED,
        Json(target_json(&st, t, &portals(&st)?)?),
    )
        .into_response())
}

async fn delete_target(
    State(st): State<ApiState>,
    Path(iqn): Path<String>,
) -> ApiResult<StatusCode> {
    let iqn = normalize_name(&iqn);
    st.meta
        .propose(Op::DeleteIscsiTarget(DeleteIscsiTarget {
            iqn: iqn.clone(),
        }))
        .await?;
    tracing::info!(iqn = %iqn, "iSCSI target deleted");
    Ok(StatusCode::NO_CONTENT)
}

async fn map_lun(
    State(st): State<ApiState>,
    Path(iqn): Path<String>,
    ApiJson(b): ApiJson<NewLun>,
) -> ApiResult<Response> {
    st.meta.read_barrier().await?;
    let iqn = normalize_name(&iqn);
    if st.meta.iscsi_target(&iqn)?.is_none() {
        return Err(missing(&format!("iSCSI target {iqn:?}")));
    }
    let vdisk = resolve_vdisk(&st, &b.vdisk)?;
    let res = st
        .meta
        .propose(Op::MapIscsiLun(MapIscsiLun {
            iqn: iqn.clone(),
            lun: Some(IscsiLun {
                lun: b.lun,
                vdisk_id: vdisk.id.clone(),
            }),
        }))
        .await?;
    let t: IscsiTargetRecord = decode(&res.record)?;
    tracing::info!(iqn = %iqn, lun = b.lun, vdisk_id = %vdisk.id, "iSCSI LUN mapped");
    Ok((
        StatusCode::CREATED,
        Json(target_json(&st, t, &portals(&st)?)?),
    )
        .into_response())
}

async fn unmap_lun(
    State(st): State<ApiState>,
    Path((iqn, lun)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let lun: u64 = lun
        .parse()
        .map_err(|_| invalid(format!("LUN {lun:?} is not a number")))?;
    let iqn = normalize_name(&iqn);
    st.meta
        .propose(Op::UnmapIscsiLun(UnmapIscsiLun {
            iqn: iqn.clone(),
            lun,
        }))
        .await?;
    tracing::info!(iqn = %iqn, lun, "iSCSI LUN unmapped");
    Ok(StatusCode::NO_CONTENT)
}
