//! The control API's migration routes (`lunctl migrate`, `lunctl
//! migrations`) and the queueing of tree operations while a LUN moves:
//! a snapshot, revert, delete, clone or flatten that arrives during a
//! migration waits, travels to the new owner with the LUN, runs there in
//! arrival order, and its answer comes back to the waiting client (or runs
//! here, in order, if the migration is aborted).

use std::sync::Arc;

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use lungate_api::migrate::{OpOutcome, QueuedOp};
use lungate_api::types as wire;
use uuid::Uuid;

use super::{created, find, ok, wire_snapshot, ApiError, ApiResult, Reg};
use crate::migrate::source::{self, Destination};
use crate::migrate::{MigrateError, Queued};
use crate::registry::Registry;
use crate::served::ServedLun;

/// Run `op` here now (never queued): the answer its route would give.
async fn run_now(reg: &Arc<Registry>, l: &Arc<ServedLun>, op: QueuedOp) -> ApiResult {
    match op {
        QueuedOp::Snapshot {
            name, description, ..
        } => {
            let (info, pause_us) = super::ops::snapshot(reg, l, name, description).await?;
            retain(reg, l).await;
            created(wire::SnapshotTaken {
                snapshot: wire_snapshot(info),
                pause_us,
            })
        }
        QueuedOp::Revert { snapshot, .. } => {
            let pause_us = super::ops::revert(reg, l, snapshot).await?;
            ok(wire::Paused { pause_us })
        }
        QueuedOp::DeleteSnapshot { snapshot, .. } => {
            super::ops::delete_snapshot(reg, l, snapshot).await?;
            ok(wire::Empty {})
        }
        QueuedOp::Clone { snapshot, name, .. } => {
            let c = super::ops::clone(reg, l, snapshot, name).await?;
            created(wire::Cloned {
                name: c.name,
                path: c.path,
                uuid: c.uuid,
                exports: c.exports,
            })
        }
        QueuedOp::Flatten { .. } => {
            super::ops::flatten(reg, l).await?;
            ok(wire::Empty {})
        }
    }
}

/// The VM's policy `keep_snapshots`: after a snapshot, delete the oldest
/// snapshots beyond that many (failures are logged; the snapshot stands).
async fn retain(reg: &Arc<Registry>, l: &Arc<ServedLun>) {
    let keep = {
        let mut h = l.lun.share();
        h.reload_state()
            .ok()
            .and_then(|()| {
                h.record_json::<lungate_api::records::Policy>(
                    lungate_api::records::RecordType::Policy,
                    0,
                )
                .ok()
                .flatten()
            })
            .and_then(|p| p.keep_snapshots)
    };
    let Some(keep) = keep else { return };
    let mut snaps = l.volume().snapshots();
    snaps.sort_by_key(|s| s.created);
    let extra = snaps.len().saturating_sub(keep as usize);
    for s in snaps.into_iter().take(extra) {
        match super::ops::delete_snapshot(reg, l, s.name.clone()).await {
            Ok(()) => tracing::info!(lun = %l.lun.name(), snapshot = %s.name, keep,
                "snapshot deleted by the VM's retention policy"),
            Err(e) => tracing::warn!(lun = %l.lun.name(), snapshot = %s.name,
                "retention policy: cannot delete the snapshot: {e}"),
        }
    }
}

fn op_lun(op: &QueuedOp) -> &str {
    match op {
        QueuedOp::Snapshot { lun, .. }
        | QueuedOp::Revert { lun, .. }
        | QueuedOp::DeleteSnapshot { lun, .. }
        | QueuedOp::Clone { lun, .. }
        | QueuedOp::Flatten { lun } => lun,
    }
}

async fn outcome(r: ApiResult) -> OpOutcome {
    let resp = match r {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    let status = resp.status().as_u16();
    let body = match axum::body::to_bytes(resp.into_body(), 16 << 20).await {
        Ok(b) => serde_json::from_slice(&b).unwrap_or(serde_json::Value::Null),
        Err(e) => serde_json::json!({ "error": e.to_string() }),
    };
    OpOutcome { status, body }
}

/// Run a queued operation where the LUN is now (the target after a
/// migration, the source after an abort), never queueing it again.
pub async fn run_queued(reg: &Arc<Registry>, op: QueuedOp) -> OpOutcome {
    let name = op_lun(&op).to_string();
    match reg.find(&name) {
        None => OpOutcome {
            status: 404,
            body: serde_json::json!({
                "error": format!("no LUN named or with UUID {name:?} is served here")
            }),
        },
        Some(l) => outcome(run_now(reg, &l, op).await).await,
    }
}

/// A tree operation from a route: run it, or queue it while the LUN moves
/// and answer with what it did where it ran.
pub(super) async fn tree_op(reg: &Arc<Registry>, l: &Arc<ServedLun>, op: QueuedOp) -> ApiResult {
    match l.migration.enqueue(op.clone()) {
        Queued::NotMoving => run_now(reg, l, op).await,
        Queued::Moved(to) => Err(ApiError(
            StatusCode::MISDIRECTED_REQUEST,
            format!(
                "LUN {} has migrated to {to}; send control operations to that gateway",
                l.lun.name()
            ),
        )),
        Queued::Waiting(rx) => match rx.await {
            Ok(o) => {
                let status = StatusCode::from_u16(o.status).unwrap_or(StatusCode::BAD_GATEWAY);
                Ok((status, Json(o.body)).into_response())
            }
            Err(_) => Err(ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the migration ended without running the queued operation".into(),
            )),
        },
    }
}

impl From<MigrateError> for ApiError {
    fn from(e: MigrateError) -> Self {
        let s = match &e {
            MigrateError::Invalid(_) => StatusCode::BAD_REQUEST,
            MigrateError::Refused(_) | MigrateError::Denied(_) => StatusCode::CONFLICT,
            MigrateError::Aborted(_) | MigrateError::Failed(_) => StatusCode::BAD_GATEWAY,
        };
        ApiError(s, e.to_string())
    }
}

/// `POST /v1/luns/{lun}/migrate`: start a migration; 202 with its state.
pub(super) async fn migrate(
    State(reg): Reg,
    UrlPath(lun): UrlPath<String>,
    body: Result<Json<wire::MigrateRequest>, axum::extract::rejection::JsonRejection>,
) -> ApiResult {
    let l = find(&reg, &lun)?;
    let Json(b) = body?;
    let settings = reg
        .migrate
        .settings()
        .cloned()
        .ok_or_else(|| ApiError(StatusCode::CONFLICT, "migration is not configured".into()))?;
    let to = match (b.to, b.to_pool) {
        (Some(to), None) => Destination::Remote(to),
        (None, Some(p)) => Destination::Local(settings.pool(Some(&p)).ok_or_else(|| {
            ApiError(
                StatusCode::BAD_REQUEST,
                format!("this gateway serves no pool {p:?}"),
            )
        })?),
        _ => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                "give exactly one of `to` (another gateway) and `to_pool` (a pool here)".into(),
            ))
        }
    };
    if b.downtime_ms == Some(0) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "downtime_ms must be at least 1".into(),
        ));
    }
    let req = source::Request {
        to,
        target_pool: b.target_pool,
        downtime_ms: b.downtime_ms.unwrap_or(settings.downtime_ms),
        max_rate: b.max_rate.filter(|r| *r > 0),
        keep_source: b.keep_source,
        with_dependents: b.with_dependents,
        token: b.token,
        hold: b
            .hold
            .then(|| std::time::Duration::from_millis(b.hold_ms.unwrap_or(60_000))),
        auto_converge: b.auto_converge.unwrap_or(true),
    };
    let t = source::start(&reg, &l, req).await?;
    Ok((StatusCode::ACCEPTED, Json(t.snapshot())).into_response())
}

/// `GET /v1/migrations`.
pub(super) async fn list(State(reg): Reg) -> ApiResult {
    ok(reg.migrate.list())
}

fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    id.parse()
        .map_err(|_| ApiError(StatusCode::BAD_REQUEST, format!("{id:?} is not a UUID")))
}

/// `GET /v1/migrations/{id}`.
pub(super) async fn get_one(State(reg): Reg, UrlPath(id): UrlPath<String>) -> ApiResult {
    let id = parse_id(&id)?;
    match reg.migrate.get(id) {
        Some(t) => ok(t.snapshot()),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no migration {id} is known here"),
        )),
    }
}

/// `POST /v1/migrations/{id}/release`: a held migration may switch.
pub(super) async fn release(State(reg): Reg, UrlPath(id): UrlPath<String>) -> ApiResult {
    let id = parse_id(&id)?;
    let t = reg.migrate.get(id).ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("no migration {id} is known here"),
        )
    })?;
    let info = t.snapshot();
    if info.phase.is_final() {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("migration {id} is over ({:?})", info.phase),
        ));
    }
    t.release.cancel();
    Ok((StatusCode::ACCEPTED, Json(t.snapshot())).into_response())
}

fn abort_one(t: &crate::migrate::Tracked) -> Response {
    let info = t.snapshot();
    if info.phase.is_final() {
        return ApiError(
            StatusCode::CONFLICT,
            format!("migration {} is over ({:?})", info.id, info.phase),
        )
        .into_response();
    }
    t.abort.cancel();
    (StatusCode::ACCEPTED, Json(t.snapshot())).into_response()
}

/// `POST /v1/migrations/{id}/abort`: abort a running migration (before
/// its commit; after it, the migration completes anyway).
pub(super) async fn abort(State(reg): Reg, UrlPath(id): UrlPath<String>) -> ApiResult {
    let id = parse_id(&id)?;
    match reg.migrate.get(id) {
        Some(t) => Ok(abort_one(&t)),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no migration {id} is known here"),
        )),
    }
}

/// `POST /v1/luns/{lun}/migrate/abort`: abort the LUN's running migration.
pub(super) async fn abort_lun(State(reg): Reg, UrlPath(lun): UrlPath<String>) -> ApiResult {
    let name = match reg.find(&lun) {
        Some(l) => l.lun.name().to_string(),
        None => lun.clone(),
    };
    let running = reg.migrate.running_of(&name);
    match running.first() {
        Some(t) => Ok(abort_one(t)),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no migration of {lun:?} is running"),
        )),
    }
}
