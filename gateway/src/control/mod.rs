//! The control API: HTTP/1.1 + JSON over a unix socket (mode 0600) and,
//! optionally, TCP with a bearer token. Routes and shapes are those of the
//! issue-4 contract and `docs/openapi.yaml`; `docs/control-api.md` shows
//! how to use them.
//!
//! This module parses requests, finds the LUN and maps results to HTTP; the
//! operations themselves live in [`ops`]. It never touches NBD sessions: a
//! live switch reaches them only through the LUN's gate.

mod https;
mod migrate;
pub mod ops;
pub mod records;
mod replicate;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Path as UrlPath, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use lungate_api::types as wire;
use serde::Serialize;
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;

use crate::export::ExportStats;
use crate::registry::Registry;
use crate::served::ServedLun;
use ops::OpError;

use lungate_api::migrate::QueuedOp;
pub use migrate::run_queued;

/// Largest body `apply-diff` accepts (the file is verified in memory).
pub const MAX_DIFF_BODY: usize = 4 << 30;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot listen on control socket {path}: {source}")]
    BindUnix {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control socket {0} is in use by a running gateway")]
    InUse(PathBuf),
    #[error("cannot listen on control tcp {addr}: {source}")]
    BindTcp {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot read control token file {path}: {source}")]
    Token {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control token file {0} is empty")]
    EmptyToken(PathBuf),
}

/// Bound control listeners, served by [`Control::run`].
pub struct Control {
    unix: Option<(UnixListener, PathBuf)>,
    tcp: Option<(TcpListener, Arc<Vec<u8>>)>,
    /// TLS for the TCP listener (`control.tls`).
    tls: Option<Arc<rustls::ServerConfig>>,
    registry: Arc<Registry>,
}

impl Control {
    /// Bind the unix socket (replacing a stale one, never a live one) with
    /// mode 0600, and the TCP listener if configured (HTTPS with `tls`).
    pub async fn bind(
        registry: Arc<Registry>,
        unix: Option<&Path>,
        tcp: Option<(SocketAddr, &Path)>,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Result<Control, ControlError> {
        let unix = match unix {
            None => None,
            Some(path) => {
                if let Ok(m) = std::fs::symlink_metadata(path) {
                    use std::os::unix::fs::FileTypeExt;
                    if m.file_type().is_socket() {
                        if std::os::unix::net::UnixStream::connect(path).is_ok() {
                            return Err(ControlError::InUse(path.into()));
                        }
                        let _ = std::fs::remove_file(path);
                    }
                }
                let l = UnixListener::bind(path).map_err(|source| ControlError::BindUnix {
                    path: path.into(),
                    source,
                })?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(
                    |source| ControlError::BindUnix {
                        path: path.into(),
                        source,
                    },
                )?;
                Some((l, path.to_path_buf()))
            }
        };
        let tcp = match tcp {
            None => None,
            Some((addr, token_file)) => {
                let text =
                    std::fs::read_to_string(token_file).map_err(|source| ControlError::Token {
                        path: token_file.into(),
                        source,
                    })?;
                let token = text.lines().next().unwrap_or("").trim().to_string();
                if token.is_empty() {
                    return Err(ControlError::EmptyToken(token_file.into()));
                }
                let l = TcpListener::bind(addr)
                    .await
                    .map_err(|source| ControlError::BindTcp { addr, source })?;
                Some((l, Arc::new(token.into_bytes())))
            }
        };
        Ok(Control {
            unix,
            tcp,
            tls,
            registry,
        })
    }

    /// `control unix PATH` / `control tcp ADDR` lines for stdout.
    pub fn listening(&self) -> Vec<String> {
        let mut v = Vec::new();
        if let Some((_, p)) = &self.unix {
            v.push(format!("control unix {}", p.display()));
        }
        if let Some((l, _)) = &self.tcp {
            if let Ok(a) = l.local_addr() {
                let tls = if self.tls.is_some() { " tls" } else { "" };
                v.push(format!("control tcp {a}{tls}"));
            }
        }
        v
    }

    /// Serve until `shutdown`; removes the unix socket afterwards.
    pub async fn run(self, shutdown: CancellationToken) {
        let app = router(self.registry.clone());
        let mut tasks = Vec::new();
        let unix_path = self.unix.as_ref().map(|(_, p)| p.clone());
        if let Some((l, _)) = self.unix {
            let (app, stop) = (app.clone(), shutdown.clone());
            tasks.push(tokio::spawn(async move {
                if let Err(e) = axum::serve(l, app)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await
                {
                    tracing::error!(error = %e, "control API (unix) stopped");
                }
            }));
        }
        if let Some((l, token)) = self.tcp {
            let app = app.layer(axum::middleware::from_fn_with_state(token, require_token));
            let stop = shutdown.clone();
            let tls = self.tls.clone();
            tasks.push(tokio::spawn(async move {
                let served = match tls {
                    None => {
                        axum::serve(l, app)
                            .with_graceful_shutdown(stop.cancelled_owned())
                            .await
                    }
                    Some(cfg) => {
                        axum::serve(https::TlsListener::new(l, cfg, stop.clone()), app)
                            .with_graceful_shutdown(stop.cancelled_owned())
                            .await
                    }
                };
                if let Err(e) = served {
                    tracing::error!(error = %e, "control API (tcp) stopped");
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        if let Some(p) = unix_path {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Equal-length comparison whose time does not depend on where the bytes
/// differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u8 | u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0xff);
        diff |= x ^ y;
    }
    diff == 0
}

/// The token of a request's `Authorization` header, parsed strictly:
/// exactly one such header, scheme `Bearer` (case-insensitive, RFC 9110),
/// exactly one space, then the token with nothing around it. `None` for
/// anything else.
fn bearer_token(headers: &axum::http::HeaderMap) -> Option<&[u8]> {
    let mut all = headers.get_all(header::AUTHORIZATION).iter();
    let value = all.next()?;
    if all.next().is_some() {
        return None;
    }
    let v = value.as_bytes();
    let (scheme, rest) = v.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"Bearer ") {
        return None;
    }
    let token_char = |b: &u8| b.is_ascii_graphic();
    (!rest.is_empty() && rest.iter().all(token_char)).then_some(rest)
}

async fn require_token(State(token): State<Arc<Vec<u8>>>, req: Request, next: Next) -> Response {
    let ok = bearer_token(req.headers()).is_some_and(|t| constant_time_eq(t, &token));
    if ok {
        next.run(req).await
    } else {
        let mut r = error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        r
    }
}

type Reg = State<Arc<Registry>>;

pub fn router(reg: Arc<Registry>) -> Router {
    Router::new()
        .route("/v1/exports", get(exports))
        .route("/v1/stats", get(stats))
        .route("/v1/luns", get(luns))
        .route("/v1/luns/{lun}/snapshots", get(snapshots).post(snapshot))
        .route("/v1/luns/{lun}/snapshots/{snap}", delete(delete_snapshot))
        .route("/v1/luns/{lun}/revert", post(revert))
        .route("/v1/luns/{lun}/clone", post(clone))
        .route("/v1/luns/{lun}/flatten", post(flatten))
        .route("/v1/luns/{lun}/diff", get(diff))
        .route("/v1/luns/{lun}/diff-file", get(diff_file))
        .route(
            "/v1/luns/{lun}/apply-diff",
            post(apply_diff).layer(DefaultBodyLimit::max(MAX_DIFF_BODY)),
        )
        .route("/v1/luns/{lun}/usage", get(usage))
        .route("/v1/luns/{lun}/migrate", post(migrate::migrate))
        .route("/v1/luns/{lun}/migrate/abort", post(migrate::abort_lun))
        .route("/v1/luns/{lun}/replicate", post(replicate::start))
        .route("/v1/luns/{lun}/replicate/stop", post(replicate::stop))
        .route("/v1/replications", get(replicate::list))
        .route("/v1/replicas/{lun}/failover", post(replicate::failover))
        .route("/v1/migrations", get(migrate::list))
        .route("/v1/migrations/{id}", get(migrate::get_one))
        .route("/v1/migrations/{id}/abort", post(migrate::abort))
        .route("/v1/migrations/{id}/release", post(migrate::release))
        .route("/v1/luns/{lun}/scrub", post(scrub))
        .route(
            "/v1/luns/{lun}/records",
            get(records::list)
                .post(records::write)
                .layer(DefaultBodyLimit::disable()),
        )
        .route(
            "/v1/luns/{lun}/records/{rtype}/{instance}",
            get(records::read),
        )
        .route(
            "/v1/luns/{lun}/snapshots/{snap}/records/{rtype}/{instance}",
            get(records::read_in_snapshot),
        )
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such route") })
        .with_state(reg)
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(wire::ErrorBody { error: msg.into() })).into_response()
}

/// An error response; every handler returns `Result<_, ApiError>`.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error(self.0, self.1)
    }
}

impl From<OpError> for ApiError {
    fn from(e: OpError) -> Self {
        let s = match &e {
            OpError::NotFound(_) => StatusCode::NOT_FOUND,
            OpError::Conflict(_) => StatusCode::CONFLICT,
            OpError::BadRequest(_) => StatusCode::BAD_REQUEST,
            OpError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(s, e.to_string())
    }
}

impl From<axum::extract::rejection::JsonRejection> for ApiError {
    fn from(e: axum::extract::rejection::JsonRejection) -> Self {
        ApiError(StatusCode::BAD_REQUEST, format!("bad request body: {e}"))
    }
}

impl From<axum::extract::rejection::QueryRejection> for ApiError {
    fn from(e: axum::extract::rejection::QueryRejection) -> Self {
        ApiError(StatusCode::BAD_REQUEST, format!("bad query: {e}"))
    }
}

type ApiResult = Result<Response, ApiError>;

fn find(reg: &Registry, id: &str) -> Result<Arc<ServedLun>, ApiError> {
    reg.find(id).ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("no LUN named or with UUID {id:?} is served here"),
        )
    })
}

fn ok(v: impl Serialize) -> ApiResult {
    Ok(Json(v).into_response())
}

fn created(v: impl Serialize) -> ApiResult {
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

// ----- library types to wire types -------------------------------------------

fn wire_layout(l: lun_manager::Layout) -> wire::Layout {
    match l {
        lun_manager::Layout::Offset => wire::Layout::Offset,
        lun_manager::Layout::Truncate => wire::Layout::Truncate,
        lun_manager::Layout::Aligned => wire::Layout::Aligned,
    }
}

pub(crate) use lun_manager::lun::layouts::wire_snapshot;

fn wire_change(c: lungate_block::volume::Change) -> wire::Change {
    wire::Change {
        offset: c.offset,
        length: c.length,
        kind: match c.kind {
            lungate_block::volume::ChangeKind::Data => wire::ChangeKind::Data,
            lungate_block::volume::ChangeKind::Zero => wire::ChangeKind::Zero,
        },
    }
}

fn wire_usage(u: lungate_block::volume::LayerUsage) -> wire::LayerUsage {
    wire::LayerUsage {
        layer: u.layer,
        path: u.path,
        snapshot: u.snapshot,
        live: u.live,
        in_chain: u.in_chain,
        external: u.external,
        allocated_bytes: u.allocated_bytes,
        disk_bytes: u.disk_bytes,
    }
}

// ----- handlers ----------------------------------------------------------------

async fn exports(State(reg): Reg) -> ApiResult {
    let set = reg.exports.current();
    let v: Vec<wire::ExportInfo> = set
        .iter()
        .map(|e| {
            let lun = e.lun.as_ref();
            wire::ExportInfo {
                name: e.name.clone(),
                lun: lun.map(|l| l.lun.name().to_string()),
                lun_uuid: lun.map(|l| l.lun.uuid()),
                disk: e.disk,
                size: e.size(),
                read_only: e.read_only,
                connections: ExportStats::get(&e.stats.connections),
            }
        })
        .collect();
    ok(v)
}

async fn stats(State(reg): Reg) -> ApiResult {
    let set = reg.exports.current();
    let exports: Vec<wire::ExportStats> = set
        .iter()
        .map(|e| {
            let s = &e.stats;
            wire::ExportStats {
                name: e.name.clone(),
                reads: ExportStats::get(&s.reads),
                writes: ExportStats::get(&s.writes),
                bytes_read: ExportStats::get(&s.bytes_read),
                bytes_written: ExportStats::get(&s.bytes_written),
                errors: ExportStats::get(&s.errors),
                in_flight: ExportStats::get(&s.in_flight),
            }
        })
        .collect();
    let sw = reg.switch_stats.summary();
    ok(wire::Stats {
        exports,
        switch: wire::SwitchSummary {
            count: sw.count,
            p50_us: sw.p50_us,
            p99_us: sw.p99_us,
            max_us: sw.max_us,
            held_requests: sw.held_requests,
        },
    })
}

async fn luns(State(reg): Reg) -> ApiResult {
    let v: Vec<wire::LunInfo> = reg
        .luns()
        .iter()
        .map(|l| wire::LunInfo {
            name: l.lun.name().to_string(),
            path: l.lun.path().to_path_buf(),
            uuid: l.lun.uuid(),
            layout: wire_layout(l.lun.layout()),
            snapshots: l.volume().snapshots().len(),
        })
        .collect();
    ok(v)
}

async fn snapshots(State(reg): Reg, UrlPath(lun): UrlPath<String>) -> ApiResult {
    let l = find(&reg, &lun)?;
    ok(ops::snapshots(&reg, &l).await?)
}

async fn snapshot(
    State(reg): Reg,
    UrlPath(lun): UrlPath<String>,
    body: Result<Json<wire::SnapshotRequest>, axum::extract::rejection::JsonRejection>,
) -> ApiResult {
    let l = find(&reg, &lun)?;
    let Json(b) = body?;
    let op = QueuedOp::Snapshot {
        lun: l.lun.name().to_string(),
        name: b.name,
        description: b.description,
    };
    migrate::tree_op(&reg, &l, op).await
}

async fn delete_snapshot(
    State(reg): Reg,
    UrlPath((lun, snap)): UrlPath<(String, String)>,
) -> ApiResult {
    let l = find(&reg, &lun)?;
    let op = QueuedOp::DeleteSnapshot {
        lun: l.lun.name().to_string(),
        snapshot: snap,
    };
    migrate::tree_op(&reg, &l, op).await
}

async fn revert(
    State(reg): Reg,
    UrlPath(lun): UrlPath<String>,
    body: Result<Json<wire::RevertRequest>, axum::extract::rejection::JsonRejection>,
) -> ApiResult {
    let l = find(&reg, &lun)?;
    let Json(b) = body?;
    let op = QueuedOp::Revert {
        lun: l.lun.name().to_string(),
        snapshot: b.snapshot,
    };
    migrate::tree_op(&reg, &l, op).await
}

async fn clone(
    State(reg): Reg,
    UrlPath(lun): UrlPath<String>,
    body: Result<Json<wire::CloneRequest>, axum::extract::rejection::JsonRejection>,
) -> ApiResult {
    let l = find(&reg, &lun)?;
    let Json(b) = body?;
    let op = QueuedOp::Clone {
        lun: l.lun.name().to_string(),
        snapshot: b.snapshot,
        name: b.name,
    };
    migrate::tree_op(&reg, &l, op).await
}

async fn flatten(State(reg): Reg, UrlPath(lun): UrlPath<String>) -> ApiResult {
    let l = find(&reg, &lun)?;
    let op = QueuedOp::Flatten {
        lun: l.lun.name().to_string(),
    };
    migrate::tree_op(&reg, &l, op).await
}

async fn diff(
    State(reg): Reg,
    UrlPath(lun): UrlPath<String>,
    q: Result<Query<wire::DiffQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let l = find(&reg, &lun)?;
    let Query(q) = q?;
    let changes = ops::diff(&reg, &l, q.from, q.to)
        .await?
        .into_iter()
        .map(wire_change)
        .collect();
    ok(wire::Diff { changes })
}

async fn diff_file(
    State(reg): Reg,
    UrlPath(lun): UrlPath<String>,
    q: Result<Query<wire::DiffQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let l = find(&reg, &lun)?;
    let Query(q) = q?;
    let bytes = ops::diff_file(&reg, &l, q.from, q.to).await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

async fn apply_diff(
    State(reg): Reg,
    UrlPath(lun): UrlPath<String>,
    body: axum::body::Bytes,
) -> ApiResult {
    let l = find(&reg, &lun)?;
    ops::apply_diff(&reg, &l, body).await?;
    ok(wire::Empty {})
}

async fn scrub(State(reg): Reg, UrlPath(lun): UrlPath<String>) -> ApiResult {
    let l = find(&reg, &lun)?;
    ok(ops::scrub(&reg, &l).await?)
}

async fn usage(State(reg): Reg, UrlPath(lun): UrlPath<String>) -> ApiResult {
    let l = find(&reg, &lun)?;
    let v: Vec<wire::LayerUsage> = ops::usage(&reg, &l)
        .await?
        .into_iter()
        .map(wire_usage)
        .collect();
    ok(v)
}

#[cfg(test)]
mod tests {
    use super::{bearer_token, constant_time_eq};
    use axum::http::{header::AUTHORIZATION, HeaderMap, HeaderValue};

    fn headers(values: &[&[u8]]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(AUTHORIZATION, HeaderValue::from_bytes(v).unwrap());
        }
        h
    }

    #[test]
    fn authorization_is_parsed_strictly() {
        let tok = |v: &[&[u8]]| bearer_token(&headers(v)).map(|t| t.to_vec());
        assert_eq!(tok(&[b"Bearer s3cret"]), Some(b"s3cret".to_vec()));
        assert_eq!(tok(&[b"bearer s3cret"]), Some(b"s3cret".to_vec()));
        assert_eq!(tok(&[]), None, "no header");
        assert_eq!(
            tok(&[b"Bearer s3cret", b"Bearer s3cret"]),
            None,
            "two headers"
        );
        assert_eq!(tok(&[b"Bearer  s3cret"]), None, "two spaces");
        assert_eq!(tok(&[b"Bearer s3cret "]), None, "trailing space");
        assert_eq!(tok(&[b"Bearer\ts3cret"]), None, "tab");
        assert_eq!(tok(&[b"Bearer "]), None, "empty token");
        assert_eq!(tok(&[b"Basic czNjcmV0"]), None, "other scheme");
        assert_eq!(tok(&[b"Bearers3cret"]), None, "no space");
    }

    #[test]
    fn token_comparison_is_exact() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret1"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(!constant_time_eq(b"\xff", b""));
    }
}
