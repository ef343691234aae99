//! The control API's replication routes (`lunctl replicate`, `lunctl
//! replications`, `lunctl failover`; docs/migration.md, "Replication and
//! failover"). The work is in [`crate::migrate::replicate`].

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use lungate_api::types as wire;

use super::{find, ok, ApiError, ApiResult, Reg};
use crate::migrate::replicate;

type Body<T> = Result<Json<T>, axum::extract::rejection::JsonRejection>;

/// `POST /v1/luns/{lun}/replicate`: start replicating; 202 with its state.
pub(super) async fn start(
    State(reg): Reg,
    UrlPath(lun): UrlPath<String>,
    body: Body<wire::ReplicateRequest>,
) -> ApiResult {
    let l = find(&reg, &lun)?;
    let Json(b) = body?;
    let info = replicate::start(&reg, &l, b).await?;
    Ok((StatusCode::ACCEPTED, Json(info)).into_response())
}

/// `POST /v1/luns/{lun}/replicate/stop`.
pub(super) async fn stop(State(reg): Reg, UrlPath(lun): UrlPath<String>) -> ApiResult {
    let name = reg
        .find(&lun)
        .map_or(lun.clone(), |l| l.lun.name().to_string());
    match replicate::stop(&reg, &name) {
        Some(i) => ok(i),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no replication of {lun:?} is running"),
        )),
    }
}

/// `GET /v1/replications`.
pub(super) async fn list(State(reg): Reg) -> ApiResult {
    ok(replicate::list(&reg))
}

/// `POST /v1/replicas/{lun}/failover`.
pub(super) async fn failover(
    State(reg): Reg,
    UrlPath(lun): UrlPath<String>,
    body: Body<wire::FailoverRequest>,
) -> ApiResult {
    let Json(b) = body?;
    ok(replicate::failover(&reg, &lun, b).await?)
}
