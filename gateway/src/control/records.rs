//! State-record routes: list, read and write the records of a served LUN's
//! hidden state region (docs/control-api.md, *State records*). They are how
//! `vmm-shim` keeps a VM's vCPU, device and memory state without opening
//! the LUN file, and how `lunctl` changes a served LUN's hardware config.
//!
//! Payloads stream in both directions through bounded channels between the
//! HTTP task and a blocking task that reads or writes the volume: a memory
//! image passes through in 1 MiB pieces and is never held whole. A batch
//! write runs under the LUN's maintenance lock (one writer of the directory
//! at a time, never during a snapshot or revert) and commits one directory
//! generation at the end, or nothing.
//!
//! Records the gateway and `lunctl` manage themselves (owner, identity,
//! snapshot tree, secondary disks) are read-only here.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::IntoResponse;
use bytes::Bytes;
use http_body_util::BodyExt;
use lun_manager::format::state::{self, HardwareConfig, RecordType};
use lungate_api::types::{self as wire, BLAKE3_HEADER, MAX_BATCH_HEADER};
use tokio::sync::mpsc;

use super::{find, ok, ApiError, ApiResult, Reg};
use crate::registry::Registry;
use crate::served::ServedLun;

/// Record types a client may write or remove.
fn writable_type(t: RecordType) -> bool {
    matches!(
        t,
        RecordType::HardwareConfig
            | RecordType::VcpuState
            | RecordType::DeviceState
            | RecordType::MemoryMap
            | RecordType::MemoryImage
            | RecordType::GuestService
            | RecordType::Policy
    )
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

fn parse_type(s: &str) -> Result<RecordType, ApiError> {
    s.parse::<RecordType>().map_err(bad)
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

fn lun_err(e: lun_manager::Error) -> ApiError {
    ApiError::from(super::ops::OpError::from(e))
}

/// `GET /v1/luns/{lun}/records`
pub async fn list(State(reg): Reg, UrlPath(lun): UrlPath<String>) -> ApiResult {
    let l = find(&reg, &lun)?;
    let out = tokio::task::spawn_blocking(move || {
        let mut h = l.lun.share();
        h.reload_state()?;
        let st = *h.label().state_region();
        let d = h.directory();
        Ok::<_, lun_manager::Error>(wire::Records {
            generation: d.generation,
            capacity: st
                .length
                .saturating_sub(state::data_start(h.label().layout)),
            used: d.used_bytes(),
            records: d
                .entries
                .iter()
                .map(|e| wire::RecordInfo {
                    rtype: e.rtype,
                    instance: e.instance,
                    length: e.length,
                    blake3: blake3::Hash::from_bytes(e.checksum).to_hex().to_string(),
                })
                .collect(),
        })
    })
    .await
    .map_err(internal)?
    .map_err(lun_err)?;
    ok(out)
}

/// A response body fed from a channel by the blocking reader; an `Err`
/// item aborts the response (the client sees a short body).
struct ChannelBody(mpsc::Receiver<Result<Bytes, std::io::Error>>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|o| o.map(|r| r.map(http_body::Frame::data)))
    }
}

/// `GET /v1/luns/{lun}/records/{type}/{instance}`: the payload, streamed,
/// with its length and blake3 in the headers. The stream is checked as it
/// is read; a mismatch cuts it short.
pub async fn read(
    State(reg): Reg,
    UrlPath((lun, rtype, instance)): UrlPath<(String, String, u16)>,
) -> ApiResult {
    let l = find(&reg, &lun)?;
    let rtype = parse_type(&rtype)?;
    let h = l.lun.share();
    let (h, entry) = tokio::task::spawn_blocking(move || {
        let mut h = h;
        let e = h.record_entry(rtype, instance);
        (h, e)
    })
    .await
    .map_err(internal)?;
    let e = entry.map_err(lun_err)?.ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("no state record {rtype} #{instance}"),
        )
    })?;
    let (tx, rx) = mpsc::channel(2);
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; 1 << 20];
        let mut hasher = blake3::Hasher::new();
        let mut at = 0u64;
        while at < e.length {
            let n = usize::try_from((e.length - at).min(buf.len() as u64)).expect("≤ 1 MiB");
            if let Err(x) = h.read_record_at(&e, at, &mut buf[..n]) {
                let _ = tx.blocking_send(Err(std::io::Error::other(x.to_string())));
                return;
            }
            hasher.update(&buf[..n]);
            at += n as u64;
            if at == e.length && hasher.finalize().as_bytes() != &e.checksum {
                tracing::error!(lun = %h.name(), record = %e.rtype, instance = e.instance,
                    "state record payload checksum mismatch while streaming");
                let _ = tx.blocking_send(Err(std::io::Error::other("payload checksum mismatch")));
                return;
            }
            if tx
                .blocking_send(Ok(Bytes::copy_from_slice(&buf[..n])))
                .is_err()
            {
                return;
            }
        }
    });
    let mut r = Body::new(ChannelBody(rx)).into_response();
    let hd = r.headers_mut();
    hd.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    hd.insert(header::CONTENT_LENGTH, HeaderValue::from(e.length));
    hd.insert(
        BLAKE3_HEADER,
        HeaderValue::from_str(&blake3::Hash::from_bytes(e.checksum).to_hex()).expect("hex"),
    );
    Ok(r)
}

/// Reads the rest of a request body from a channel, blocking (the
/// writer's side of the pipe from the HTTP task).
struct ChannelReader {
    rx: mpsc::Receiver<Bytes>,
    cur: Bytes,
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(b) => self.cur = b,
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.cur.len());
        out[..n].copy_from_slice(&self.cur[..n]);
        bytes::Buf::advance(&mut self.cur, n);
        Ok(n)
    }
}

/// What a JSON record must be before it is committed.
fn check_json(
    layout: lun_manager::Layout,
    region_len: u64,
) -> impl FnMut(RecordType, u16, &[u8]) -> Result<(), String> + Send + 'static {
    move |t, _, b| match t {
        RecordType::HardwareConfig => {
            let hw: HardwareConfig =
                serde_json::from_slice(b).map_err(|e| format!("not a hardware config: {e}"))?;
            if hw.vcpus == 0 || hw.vcpus > 255 {
                return Err(format!("vcpus {} is not in 1..=255", hw.vcpus));
            }
            let need = state::state_region_len(layout, hw.memory_bytes)
                .ok_or_else(|| format!("memory size {} is too large", hw.memory_bytes))?;
            if need > region_len {
                return Err(format!(
                    "memory {} bytes needs a state region of {need} bytes; this LUN's is {region_len} \
                     (grow it offline with lunctl resize --memory)",
                    hw.memory_bytes
                ));
            }
            Ok(())
        }
        RecordType::Policy => serde_json::from_slice::<lungate_api::records::Policy>(b)
            .map(|_| ())
            .map_err(|e| format!("not a policy: {e}")),
        _ => serde_json::from_slice::<serde_json::Value>(b)
            .map(|_| ())
            .map_err(|e| format!("not JSON: {e}")),
    }
}

/// `POST /v1/luns/{lun}/records`: a [`wire::RecordBatch`] header, then the
/// payloads; see [`wire::RecordBatch`] for the body's layout.
pub async fn write(
    State(reg): Reg,
    UrlPath(lun): UrlPath<String>,
    req: axum::extract::Request,
) -> ApiResult {
    let l = find(&reg, &lun)?;
    if l.read_only {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("LUN {} is served read-only", l.lun.name()),
        ));
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| {
            ApiError(
                StatusCode::LENGTH_REQUIRED,
                "a record batch needs a Content-Length".into(),
            )
        })?;
    let mut body = req.into_body();
    let mut pending = bytes::BytesMut::new();
    let mut next_frame = async |pending: &mut bytes::BytesMut| -> Result<bool, ApiError> {
        match body.frame().await {
            None => Ok(false),
            Some(Err(e)) => Err(bad(format!("request body: {e}"))),
            Some(Ok(f)) => {
                if let Ok(d) = f.into_data() {
                    pending.extend_from_slice(&d);
                }
                Ok(true)
            }
        }
    };
    // The header: its length, then JSON.
    while pending.len() < 4 {
        if !next_frame(&mut pending).await? {
            return Err(bad("record batch body ends before its header length"));
        }
    }
    let hlen = u32::from_le_bytes(pending[..4].try_into().expect("4"));
    if hlen > MAX_BATCH_HEADER {
        return Err(bad(format!(
            "record batch header of {hlen} bytes exceeds {MAX_BATCH_HEADER}"
        )));
    }
    let hend = 4 + hlen as usize;
    while pending.len() < hend {
        if !next_frame(&mut pending).await? {
            return Err(bad("record batch body ends inside its header"));
        }
    }
    let batch: wire::RecordBatch = serde_json::from_slice(&pending[4..hend])
        .map_err(|e| bad(format!("bad record batch header: {e}")))?;
    for t in batch
        .put
        .iter()
        .map(|p| p.rtype)
        .chain(batch.remove.iter().map(|r| r.rtype))
    {
        if !writable_type(t) {
            return Err(bad(format!(
                "state record {t} is managed by lungate and lunctl and cannot be written here"
            )));
        }
    }
    let payload = batch
        .payload_len()
        .ok_or_else(|| bad("record batch lengths overflow"))?;
    if payload.checked_add(hend as u64) != Some(declared) {
        return Err(bad(format!(
            "Content-Length {declared} is not the header's {hend} bytes plus its payloads' {payload}"
        )));
    }
    let _ = pending.split_to(hend);

    // One directory writer at a time, never inside a snapshot or revert.
    let held = l.maintenance.lock().await;
    let (tx, rx) = mpsc::channel::<Bytes>(2);
    let writer = spawn_writer(&reg, &l, batch, rx);
    let mut sent = 0u64;
    let mut feed = async || -> Result<(), ApiError> {
        if !pending.is_empty() {
            sent += pending.len() as u64;
            if tx.send(pending.split().freeze()).await.is_err() {
                while let Some(Ok(_)) = body.frame().await {}
                return Ok(());
            }
        }
        loop {
            match body.frame().await {
                None => return Ok(()),
                Some(Err(e)) => return Err(bad(format!("request body: {e}"))),
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        sent += d.len() as u64;
                        if sent > payload {
                            return Err(bad("request body is longer than its Content-Length"));
                        }
                        if tx.send(d).await.is_err() {
                            // The writer stopped early (its result says
                            // why): read the rest, so the client is not
                            // cut off mid-upload and gets the answer.
                            while let Some(Ok(_)) = body.frame().await {}
                            return Ok(());
                        }
                    }
                }
            }
        }
    };
    let fed = feed().await;
    drop(tx);
    let r = writer.await.map_err(internal)?;
    drop(held);
    fed?;
    let generation = r.map_err(lun_err)?;
    ok(wire::RecordsWritten { generation })
}

fn spawn_writer(
    _reg: &Registry,
    l: &Arc<ServedLun>,
    batch: wire::RecordBatch,
    rx: mpsc::Receiver<Bytes>,
) -> tokio::task::JoinHandle<lun_manager::Result<u64>> {
    let mut h = l.lun.share();
    tokio::task::spawn_blocking(move || {
        let region = h.label().state_region().length;
        let layout = h.label().layout;
        let puts: Vec<(RecordType, u16, u64)> = batch
            .put
            .iter()
            .map(|p| (p.rtype, p.instance, p.length))
            .collect();
        let removes: Vec<(RecordType, u16)> =
            batch.remove.iter().map(|r| (r.rtype, r.instance)).collect();
        let mut src = ChannelReader {
            rx,
            cur: Bytes::new(),
        };
        let mut check = check_json(layout, region);
        h.write_records_from(&puts, &removes, &mut src, &mut check)
    })
}

/// `GET /v1/luns/{lun}/snapshots/{snap}/records/{type}/{instance}`: a small
/// record (at most 16 MiB) as the snapshot holds it, read from the frozen
/// layer; nothing live changes.
pub async fn read_in_snapshot(
    State(reg): Reg,
    UrlPath((lun, snap, rtype, instance)): UrlPath<(String, String, String, u16)>,
) -> ApiResult {
    let l = find(&reg, &lun)?;
    let rtype = parse_type(&rtype)?;
    if !l.volume().snapshots().iter().any(|s| s.name == snap) {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no snapshot named {snap:?}"),
        ));
    }
    let h = l.lun.share();
    let s2 = snap.clone();
    let b = tokio::task::spawn_blocking(move || h.snapshot_record(&s2, rtype, instance))
        .await
        .map_err(internal)?
        .map_err(lun_err)?
        .ok_or_else(|| {
            ApiError(
                StatusCode::NOT_FOUND,
                format!("snapshot {snap:?} has no state record {rtype} #{instance}"),
            )
        })?;
    let sum = blake3::hash(&b).to_hex().to_string();
    let mut r = Body::from(b).into_response();
    let hd = r.headers_mut();
    hd.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    hd.insert(BLAKE3_HEADER, HeaderValue::from_str(&sum).expect("hex"));
    Ok(r)
}
