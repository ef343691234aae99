//! A typed, blocking client for a gateway's control API (HTTP/1.1 + JSON,
//! docs/control-api.md) over its unix socket or over TCP with a bearer
//! token: what `lunctl` uses when a gateway holds the LUN it was asked to
//! change, and what `vmm-shim` keeps a VM's state through.
//!
//! Each call opens one connection and runs hyper on a current-thread tokio
//! runtime the client owns; callers see plain blocking functions. An error
//! reply (`{"error": "..."}` with a 4xx/5xx status) becomes
//! [`Error::Status`] carrying the gateway's status and message.
//!
//! State records stream both ways ([`Client::record_reader`],
//! [`Client::write_records`]): a memory image passes through in bounded
//! chunks and is never held whole in this process.

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::records::RecordType;
use crate::types::*;

/// Where a gateway's control API listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    /// TCP; every request carries `Authorization: Bearer TOKEN`.
    Tcp {
        addr: SocketAddr,
        token: String,
    },
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "control socket {}", p.display()),
            Endpoint::Tcp { addr, .. } => write!(f, "control tcp {addr}"),
        }
    }
}

#[derive(Debug, Error)]
pub enum Error {
    #[error("{endpoint}: {source}")]
    Connect {
        /// The endpoint, as [`Endpoint`] displays it.
        endpoint: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{endpoint}: {method} {path}: {why}")]
    Http {
        endpoint: String,
        method: String,
        path: String,
        why: String,
    },
    /// The gateway answered with an error status.
    #[error("gateway refused {method} {path} (HTTP {status}): {message}")]
    Status {
        method: String,
        path: String,
        status: u16,
        message: String,
    },
    #[error("gateway answered {method} {path} with unexpected JSON: {why}")]
    Json {
        method: String,
        path: String,
        why: String,
    },
    /// A streamed record did not arrive whole or intact.
    #[error("record {record} of LUN {lun}: {why}")]
    Record {
        lun: String,
        record: String,
        why: String,
    },
}

impl Error {
    /// The HTTP status of an error reply, if the gateway sent one.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A reply with a success status.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Either socket, as one byte stream for hyper.
enum Stream {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

impl tokio::io::AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// A request body fed chunk by chunk from a bounded channel, with its
/// length known in advance (sent as Content-Length).
struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
    remaining: u64,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<Frame<Bytes>, std::io::Error>>> {
        match self.rx.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(b)) => {
                self.remaining = self.remaining.saturating_sub(b.len() as u64);
                Poll::Ready(Some(Ok(Frame::data(b))))
            }
            Poll::Ready(None) if self.remaining == 0 => Poll::Ready(None),
            Poll::Ready(None) => Poll::Ready(Some(Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("body ended {} bytes short", self.remaining),
            )))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0 && self.rx.is_closed()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

enum ReqBody {
    Full(Full<Bytes>),
    Channel(ChannelBody),
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<Frame<Bytes>, std::io::Error>>> {
        match self.get_mut() {
            ReqBody::Full(b) => Pin::new(b).poll_frame(cx).map_err(|never| match never {}),
            ReqBody::Channel(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Full(b) => b.is_end_stream(),
            ReqBody::Channel(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Full(b) => b.size_hint(),
            ReqBody::Channel(b) => b.size_hint(),
        }
    }
}

/// Chunks a streamed upload sends at a time.
const CHUNK: usize = 1 << 20;

pub struct Client {
    endpoint: Endpoint,
    rt: tokio::runtime::Runtime,
}

impl Client {
    /// A client of the control API on the unix socket `socket`.
    pub fn new(socket: &Path) -> Result<Client> {
        Self::connect(Endpoint::Unix(socket.to_path_buf()))
    }

    pub fn connect(endpoint: Endpoint) -> Result<Client> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|source| Error::Connect {
                endpoint: endpoint.to_string(),
                source,
            })?;
        Ok(Client { endpoint, rt })
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    fn http_err(&self, method: &Method, path: &str, why: String) -> Error {
        Error::Http {
            endpoint: self.endpoint.to_string(),
            method: method.to_string(),
            path: path.to_string(),
            why,
        }
    }

    /// Open a connection and send the request head and body; returns the
    /// reply head with its streaming body. Runs inside the runtime.
    async fn send(
        endpoint: Endpoint,
        method: Method,
        path: String,
        content_type: &'static str,
        body: ReqBody,
    ) -> Result<hyper::Response<Incoming>> {
        let http = |why: String| Error::Http {
            endpoint: endpoint.to_string(),
            method: method.to_string(),
            path: path.clone(),
            why,
        };
        let connect_err = |source| Error::Connect {
            endpoint: endpoint.to_string(),
            source,
        };
        let stream = match &endpoint {
            Endpoint::Unix(p) => Stream::Unix(
                tokio::net::UnixStream::connect(p)
                    .await
                    .map_err(connect_err)?,
            ),
            Endpoint::Tcp { addr, .. } => Stream::Tcp(
                tokio::net::TcpStream::connect(addr)
                    .await
                    .map_err(connect_err)?,
            ),
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| http(e.to_string()))?;
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method.clone())
            .uri(&path)
            .header(hyper::header::HOST, "lungate");
        if let Endpoint::Tcp { token, .. } = &endpoint {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let len = body.size_hint().exact().unwrap_or(0);
        if len > 0 {
            req = req
                .header(hyper::header::CONTENT_TYPE, content_type)
                .header(hyper::header::CONTENT_LENGTH, len);
        }
        let req = req.body(body).map_err(|e| http(e.to_string()))?;
        sender
            .send_request(req)
            .await
            .map_err(|e| http(e.to_string()))
    }

    /// Turn an error status into [`Error::Status`] (reading its body).
    async fn check(
        method: &Method,
        path: &str,
        resp: hyper::Response<Incoming>,
    ) -> Result<hyper::Response<Incoming>> {
        let status = resp.status().as_u16();
        if status < 400 {
            return Ok(resp);
        }
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let message = serde_json::from_slice::<ErrorBody>(&bytes)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).trim().to_string());
        Err(Error::Status {
            method: method.to_string(),
            path: path.to_string(),
            status,
            message,
        })
    }

    /// Send one request with a whole body; `Err(Status)` for a 4xx/5xx.
    pub fn request(
        &self,
        method: Method,
        path: &str,
        content_type: &'static str,
        body: Vec<u8>,
    ) -> Result<Response> {
        let ep = self.endpoint.clone();
        let m = method.clone();
        let p = path.to_string();
        self.rt.block_on(async move {
            let body = ReqBody::Full(Full::new(Bytes::from(body)));
            let resp = Self::send(ep.clone(), m.clone(), p.clone(), content_type, body).await?;
            let resp = Self::check(&m, &p, resp).await?;
            let status = resp.status().as_u16();
            let bytes = resp.into_body().collect().await.map_err(|e| Error::Http {
                endpoint: ep.to_string(),
                method: m.to_string(),
                path: p,
                why: e.to_string(),
            })?;
            Ok(Response {
                status,
                body: bytes.to_bytes().to_vec(),
            })
        })
    }

    fn parse<T: DeserializeOwned>(method: &Method, path: &str, body: &[u8]) -> Result<T> {
        let b = if body.is_empty() { b"null" } else { body };
        serde_json::from_slice(b).map_err(|e| Error::Json {
            method: method.to_string(),
            path: path.to_string(),
            why: e.to_string(),
        })
    }

    fn json<T: DeserializeOwned>(&self, method: Method, path: &str, body: Vec<u8>) -> Result<T> {
        let r = self.request(method.clone(), path, "application/json", body)?;
        Self::parse(&method, path, &r.body)
    }

    /// GET `path` and parse its JSON reply.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.json(Method::GET, path, Vec::new())
    }

    /// POST `body` as JSON to `path` and parse the reply.
    pub fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        let b = serde_json::to_vec(body).expect("request types serialise");
        self.json(Method::POST, path, b)
    }

    pub fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.json(Method::DELETE, path, Vec::new())
    }

    // ----- typed routes ----------------------------------------------------

    pub fn exports(&self) -> Result<Vec<ExportInfo>> {
        self.get("/v1/exports")
    }

    pub fn stats(&self) -> Result<Stats> {
        self.get("/v1/stats")
    }

    pub fn luns(&self) -> Result<Vec<LunInfo>> {
        self.get("/v1/luns")
    }

    /// `lun`: a served LUN's name or UUID.
    pub fn snapshots(&self, lun: &str) -> Result<Vec<SnapshotInfo>> {
        self.get(&lun_path(lun, "snapshots"))
    }

    pub fn snapshot(&self, lun: &str, name: &str, description: &str) -> Result<SnapshotTaken> {
        self.post(
            &lun_path(lun, "snapshots"),
            &SnapshotRequest {
                name: name.into(),
                description: description.into(),
            },
        )
    }

    pub fn revert(&self, lun: &str, snapshot: &str) -> Result<Paused> {
        self.post(
            &lun_path(lun, "revert"),
            &RevertRequest {
                snapshot: snapshot.into(),
            },
        )
    }

    pub fn delete_snapshot(&self, lun: &str, snapshot: &str) -> Result<Empty> {
        self.delete(&format!(
            "{}/{}",
            lun_path(lun, "snapshots"),
            encode(snapshot)
        ))
    }

    pub fn clone_lun(&self, lun: &str, snapshot: &str, name: &str) -> Result<Cloned> {
        self.post(
            &lun_path(lun, "clone"),
            &CloneRequest {
                snapshot: snapshot.into(),
                name: name.into(),
            },
        )
    }

    /// Start migrating `lun`'s VM (`POST /v1/luns/{lun}/migrate`); the
    /// migration runs on in the gateway: follow it with [`Client::migration`].
    pub fn migrate(&self, lun: &str, req: &MigrateRequest) -> Result<MigrationInfo> {
        self.post(&lun_path(lun, "migrate"), req)
    }

    /// Abort `lun`'s running migration.
    pub fn abort_migration(&self, lun: &str) -> Result<MigrationInfo> {
        self.post(&lun_path(lun, "migrate/abort"), &Empty {})
    }

    /// The migrations this gateway runs, answers or finished lately.
    pub fn migrations(&self) -> Result<Vec<MigrationInfo>> {
        self.get("/v1/migrations")
    }

    pub fn migration(&self, id: Uuid) -> Result<MigrationInfo> {
        self.get(&format!("/v1/migrations/{id}"))
    }

    /// Let a held migration (`MigrateRequest::hold`) switch.
    pub fn release_migration(&self, id: Uuid) -> Result<MigrationInfo> {
        self.post(&format!("/v1/migrations/{id}/release"), &Empty {})
    }

    /// Start replicating `lun` (see [`ReplicateRequest`]).
    pub fn replicate(&self, lun: &str, req: &ReplicateRequest) -> Result<ReplicationInfo> {
        self.post(&lun_path(lun, "replicate"), req)
    }

    /// Stop replicating `lun` (the checkpoints stay on both sides).
    pub fn stop_replication(&self, lun: &str) -> Result<ReplicationInfo> {
        self.post(&lun_path(lun, "replicate/stop"), &Empty {})
    }

    /// The replications this gateway runs (sources) and holds (replicas).
    pub fn replications(&self) -> Result<Vec<ReplicationInfo>> {
        self.get("/v1/replications")
    }

    /// Promote the replica `lun`'s newest complete checkpoint and serve it.
    pub fn failover(&self, lun: &str, req: &FailoverRequest) -> Result<FailedOver> {
        self.post(&format!("/v1/replicas/{}/failover", encode(lun)), req)
    }

    pub fn flatten(&self, lun: &str) -> Result<Empty> {
        self.post(&lun_path(lun, "flatten"), &Empty {})
    }

    pub fn diff(&self, lun: &str, from: &str, to: Option<&str>) -> Result<Diff> {
        self.get(&format!(
            "{}?{}",
            lun_path(lun, "diff"),
            diff_query(from, to)
        ))
    }

    /// The diff file (held in memory, as the gateway builds it).
    pub fn diff_file(&self, lun: &str, from: &str, to: Option<&str>) -> Result<Vec<u8>> {
        let path = format!("{}?{}", lun_path(lun, "diff-file"), diff_query(from, to));
        Ok(self
            .request(Method::GET, &path, "application/json", Vec::new())?
            .body)
    }

    pub fn apply_diff(&self, lun: &str, file: Vec<u8>) -> Result<Empty> {
        let path = lun_path(lun, "apply-diff");
        let r = self.request(Method::POST, &path, "application/octet-stream", file)?;
        Self::parse(&Method::POST, &path, &r.body)
    }

    pub fn scrub(&self, lun: &str) -> Result<Scrub> {
        self.post(&lun_path(lun, "scrub"), &Empty {})
    }

    pub fn usage(&self, lun: &str) -> Result<Vec<LayerUsage>> {
        self.get(&lun_path(lun, "usage"))
    }

    // ----- state records ---------------------------------------------------

    /// The LUN's state directory.
    pub fn records(&self, lun: &str) -> Result<Records> {
        self.get(&lun_path(lun, "records"))
    }

    /// One record's payload, whole (for small records); `None` if the LUN
    /// has no such record.
    pub fn record(&self, lun: &str, rtype: RecordType, instance: u16) -> Result<Option<Vec<u8>>> {
        match self.record_reader(lun, rtype, instance) {
            Ok(mut r) => {
                let mut out = Vec::with_capacity(usize::try_from(r.len()).unwrap_or(0));
                r.read_to_end(&mut out).map_err(|e| Error::Record {
                    lun: lun.into(),
                    record: format!("{rtype} #{instance}"),
                    why: e.to_string(),
                })?;
                Ok(Some(out))
            }
            Err(e) if e.status() == Some(404) && e.to_string().contains("no state record") => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// A small record as snapshot `snapshot` holds it (read from the frozen
    /// snapshot; nothing live changes); `None` if the snapshot has none.
    pub fn snapshot_record(
        &self,
        lun: &str,
        snapshot: &str,
        rtype: RecordType,
        instance: u16,
    ) -> Result<Option<Vec<u8>>> {
        let path = format!(
            "{}/{}/records/{}/{instance}",
            lun_path(lun, "snapshots"),
            encode(snapshot),
            rtype.name()
        );
        match self.request(Method::GET, &path, "", Vec::new()) {
            Ok(r) => Ok(Some(r.body)),
            Err(e) if e.status() == Some(404) && e.to_string().contains("has no state record") => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// A JSON record, parsed; `None` if absent.
    pub fn record_json<T: DeserializeOwned>(
        &self,
        lun: &str,
        rtype: RecordType,
        instance: u16,
    ) -> Result<Option<T>> {
        let Some(b) = self.record(lun, rtype, instance)? else {
            return Ok(None);
        };
        serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| Error::Record {
                lun: lun.into(),
                record: format!("{rtype} #{instance}"),
                why: format!("bad JSON: {e}"),
            })
    }

    /// Stream one record's payload; the reader checks its length and
    /// blake3 at the end and fails if either is wrong.
    pub fn record_reader(
        &self,
        lun: &str,
        rtype: RecordType,
        instance: u16,
    ) -> Result<RecordReader<'_>> {
        let path = record_path(lun, rtype, instance);
        let ep = self.endpoint.clone();
        let p = path.clone();
        let resp = self.rt.block_on(async move {
            let body = ReqBody::Full(Full::new(Bytes::new()));
            let r = Self::send(ep, Method::GET, p.clone(), "", body).await?;
            Self::check(&Method::GET, &p, r).await
        })?;
        let bad = |why: String| Error::Record {
            lun: lun.into(),
            record: format!("{rtype} #{instance}"),
            why,
        };
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let len = header("content-length")
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| bad("the reply has no Content-Length".into()))?;
        let sum = header(BLAKE3_HEADER)
            .and_then(|h| blake3::Hash::from_hex(h).ok())
            .ok_or_else(|| bad(format!("the reply has no {BLAKE3_HEADER} header")))?;
        Ok(RecordReader {
            client: self,
            what: format!("record {rtype} #{instance} of LUN {lun}"),
            body: resp.into_body(),
            buf: Bytes::new(),
            len,
            got: 0,
            hasher: blake3::Hasher::new(),
            sum,
        })
    }

    /// Write and remove records in one directory commit (`batch`), with
    /// each `put`'s payload produced by `fill(index, sink)`, which must
    /// send exactly that record's `length` bytes. Payloads stream to the
    /// gateway in chunks of at most 1 MiB.
    pub fn write_records(
        &self,
        lun: &str,
        batch: &RecordBatch,
        mut fill: impl FnMut(usize, &mut RecordSink<'_>) -> std::io::Result<()>,
    ) -> Result<RecordsWritten> {
        let path = lun_path(lun, "records");
        let header = batch.encode_header();
        let total = batch
            .payload_len()
            .and_then(|n| n.checked_add(header.len() as u64))
            .ok_or_else(|| self.http_err(&Method::POST, &path, "batch too large".into()))?;
        let (tx, rx) = mpsc::channel::<Bytes>(2);
        let body = ReqBody::Channel(ChannelBody {
            rx,
            remaining: total,
        });
        let ep = self.endpoint.clone();
        let p = path.clone();
        let task = self.rt.spawn(async move {
            let r = Self::send(
                ep.clone(),
                Method::POST,
                p.clone(),
                "application/octet-stream",
                body,
            )
            .await?;
            let r = Self::check(&Method::POST, &p, r).await?;
            let b = r.into_body().collect().await.map_err(|e| Error::Http {
                endpoint: ep.to_string(),
                method: "POST".into(),
                path: p.clone(),
                why: e.to_string(),
            })?;
            Self::parse::<RecordsWritten>(&Method::POST, &p, &b.to_bytes())
        });
        let mut sink = RecordSink {
            rt: &self.rt,
            tx: Some(tx),
            buf: Vec::with_capacity(CHUNK),
            left: 0,
            closed: false,
        };
        let mut local: std::io::Result<()> = sink.push(&header);
        for (i, put) in batch.put.iter().enumerate() {
            if local.is_err() {
                break;
            }
            sink.left = put.length;
            local = fill(i, &mut sink).and_then(|()| {
                if sink.left != 0 {
                    Err(std::io::Error::other(format!(
                        "record {} #{} payload is {} bytes short",
                        put.rtype, put.instance, sink.left
                    )))
                } else {
                    Ok(())
                }
            });
        }
        if local.is_ok() {
            local = sink.flush();
        }
        // Closing the channel ends the body: short if `fill` failed, and
        // the gateway then discards the batch.
        let closed = sink.closed;
        drop(sink);
        let reply = self.rt.block_on(task).map_err(|e| {
            self.http_err(&Method::POST, &path, format!("request task failed: {e}"))
        })?;
        match (local, reply) {
            // The gateway stopped the upload: its answer is the reason.
            (Err(_), Err(e)) if closed => Err(e),
            (Err(e), _) => {
                Err(self.http_err(&Method::POST, &path, format!("payload not sent: {e}")))
            }
            (Ok(()), r) => r,
        }
    }
}

/// Where [`Client::write_records`]'s `fill` writes a payload.
pub struct RecordSink<'c> {
    rt: &'c tokio::runtime::Runtime,
    tx: Option<mpsc::Sender<Bytes>>,
    buf: Vec<u8>,
    /// Bytes the current record still expects.
    left: u64,
    /// The request ended on the gateway's side: its reply says why.
    closed: bool,
}

impl RecordSink<'_> {
    fn push(&mut self, mut b: &[u8]) -> std::io::Result<()> {
        while !b.is_empty() {
            let n = (CHUNK - self.buf.len()).min(b.len());
            self.buf.extend_from_slice(&b[..n]);
            b = &b[n..];
            if self.buf.len() == CHUNK {
                self.flush()?;
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        let tx = self.tx.as_ref().expect("sink open");
        self.rt.block_on(tx.send(chunk)).map_err(|_| {
            self.closed = true;
            std::io::Error::other("the gateway closed the upload")
        })
    }

    /// Append payload bytes of the current record.
    pub fn write(&mut self, b: &[u8]) -> std::io::Result<()> {
        if b.len() as u64 > self.left {
            return Err(std::io::Error::other(format!(
                "{} bytes more than the record's declared length",
                b.len() as u64 - self.left
            )));
        }
        self.left -= b.len() as u64;
        self.push(b)
    }
}

/// A streamed record payload ([`Client::record_reader`]).
pub struct RecordReader<'c> {
    client: &'c Client,
    what: String,
    body: Incoming,
    buf: Bytes,
    len: u64,
    got: u64,
    hasher: blake3::Hasher,
    sum: blake3::Hash,
}

impl RecordReader<'_> {
    /// The payload's length.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Read for RecordReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.buf.is_empty() {
            if self.got == self.len {
                if self.hasher.finalize() != self.sum {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("{}: blake3 of what arrived does not match", self.what),
                    ));
                }
                return Ok(0);
            }
            let frame = self.client.rt.block_on(self.body.frame());
            match frame {
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        self.buf = d;
                    }
                }
                Some(Err(e)) => {
                    return Err(std::io::Error::other(format!(
                        "{}: after {} of {} bytes: {e}",
                        self.what, self.got, self.len
                    )))
                }
                None => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!(
                            "{}: the stream ended after {} of {} bytes",
                            self.what, self.got, self.len
                        ),
                    ))
                }
            }
            if self.got + self.buf.len() as u64 > self.len {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: more than the announced {} bytes", self.what, self.len),
                ));
            }
            self.got += self.buf.len() as u64;
            self.hasher.update(&self.buf);
        }
        let n = out.len().min(self.buf.len());
        out[..n].copy_from_slice(&self.buf[..n]);
        bytes::Buf::advance(&mut self.buf, n);
        Ok(n)
    }
}

/// `/v1/luns/{lun}/{what}` with `lun` percent-encoded.
pub fn lun_path(lun: &str, what: &str) -> String {
    format!("/v1/luns/{}/{what}", encode(lun))
}

/// `/v1/luns/{lun}/records/{type}/{instance}`.
pub fn record_path(lun: &str, rtype: RecordType, instance: u16) -> String {
    format!("{}/{}/{instance}", lun_path(lun, "records"), rtype.name())
}

fn diff_query(from: &str, to: Option<&str>) -> String {
    format!(
        "from={}{}",
        encode(from),
        to.map(|x| format!("&to={}", encode(x))).unwrap_or_default()
    )
}

/// A LUN named by its UUID (what `lunctl` sends: names may repeat across
/// pools, UUIDs do not).
pub fn uuid_ref(u: Uuid) -> String {
    u.to_string()
}

/// Percent-encode one path segment or query value (LUN and snapshot names
/// may hold any character but control characters).
pub fn encode(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                o.push(b as char)
            }
            _ => o.push_str(&format!("%{b:02X}")),
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;

    /// Serve `n` requests: echo method, path and body length as JSON, a
    /// 404 error body for paths under /missing, and a record stream (with
    /// a wrong checksum under /bad) for paths containing /records/.
    fn server(sock: &Path, n: usize) -> std::thread::JoinHandle<()> {
        let l = UnixListener::bind(sock).unwrap();
        std::thread::spawn(move || {
            for _ in 0..n {
                let (s, _) = l.accept().unwrap();
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                let mut parts = line.split_whitespace();
                let Some(method) = parts.next().map(str::to_string) else {
                    // An upload refused before it sent anything.
                    continue;
                };
                let path = parts.next().unwrap().to_string();
                let mut len = 0usize;
                loop {
                    let mut h = String::new();
                    r.read_line(&mut h).unwrap();
                    if h == "\r\n" {
                        break;
                    }
                    if let Some((k, v)) = h.split_once(':') {
                        if k.eq_ignore_ascii_case("content-length") {
                            len = v.trim().parse().unwrap();
                        }
                    }
                }
                let mut body = vec![0u8; len];
                if r.read_exact(&mut body).is_err() {
                    continue;
                }
                let mut s = s;
                if path.contains("/records/") {
                    let payload = vec![9u8; 3 << 20];
                    let mut sum = blake3::hash(&payload).to_hex().to_string();
                    if path.starts_with("/bad") {
                        sum = blake3::hash(b"other").to_hex().to_string();
                    }
                    write!(
                        s,
                        "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\n{BLAKE3_HEADER}: {sum}\r\nconnection: close\r\n\r\n",
                        payload.len()
                    )
                    .unwrap();
                    s.write_all(&payload).unwrap();
                    continue;
                }
                let (status, out) = if path.ends_with("/records") {
                    // A refused upload ends short; answer what arrived.
                    ("200 OK", format!(r#"{{"generation":{len}}}"#))
                } else if path.starts_with("/missing") {
                    (
                        "404 Not Found",
                        r#"{"error":"no snapshot named \"x\""}"#.to_string(),
                    )
                } else {
                    (
                        "200 OK",
                        serde_json::json!({"method": method, "path": path, "len": len, "first": body.first(), "sum": blake3::hash(&body).to_hex().to_string()})
                            .to_string(),
                    )
                };
                write!(
                    s,
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{out}",
                    out.len()
                )
                .unwrap();
            }
        })
    }

    #[test]
    fn requests_and_error_bodies_round_trip_over_a_unix_socket() {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("ctl.sock");
        let t = server(&sock, 5);
        let c = Client::new(&sock).unwrap();
        let v: serde_json::Value = c.get("/v1/luns/web/snapshots").unwrap();
        assert_eq!(v["method"], "GET");
        assert_eq!(v["path"], "/v1/luns/web/snapshots");
        let v: serde_json::Value = c
            .post("/v1/luns/web/snapshots", &serde_json::json!({"name": "s1"}))
            .unwrap();
        assert_eq!(v["method"], "POST");
        assert_eq!(v["len"], r#"{"name":"s1"}"#.len());
        let v: serde_json::Value = c.delete("/v1/luns/web/snapshots/s1").unwrap();
        assert_eq!(v["method"], "DELETE");
        let r = c
            .request(
                Method::POST,
                "/v1/luns/web/apply-diff",
                "application/octet-stream",
                vec![7u8; 100_000],
            )
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            (v["len"].as_u64(), v["first"].as_u64()),
            (Some(100_000), Some(7))
        );
        let e = c.get::<serde_json::Value>("/missing").unwrap_err();
        match &e {
            Error::Status {
                status, message, ..
            } => assert_eq!(
                (*status, message.as_str()),
                (404, "no snapshot named \"x\"")
            ),
            other => panic!("{other}"),
        }
        t.join().unwrap();
        // Nobody listening: a clear connect error naming the socket.
        let e = c.get::<serde_json::Value>("/v1/luns").unwrap_err();
        assert!(e.to_string().contains("ctl.sock"), "{e}");
    }

    #[test]
    fn records_stream_both_ways_and_a_wrong_checksum_fails_the_read() {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("ctl.sock");
        let t = server(&sock, 3);
        let c = Client::new(&sock).unwrap();
        let mut r = c.record_reader("web", RecordType::MemoryImage, 0).unwrap();
        assert_eq!(r.len(), 3 << 20);
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        assert_eq!(got, vec![9u8; 3 << 20]);

        // A batch of two payloads, 2.5 MiB in all, sent in pieces.
        let batch = RecordBatch {
            put: vec![
                RecordPut {
                    rtype: RecordType::MemoryImage,
                    instance: 0,
                    length: 5 << 19,
                },
                RecordPut {
                    rtype: RecordType::VcpuState,
                    instance: 0,
                    length: 3,
                },
            ],
            remove: vec![],
        };
        let mut expect = batch.encode_header();
        expect.extend(std::iter::repeat_n(1u8, 5 << 19));
        expect.extend([1, 2, 3]);
        // The test server answers a batch with the body's length as the
        // generation and remembers its blake3 in `first`.
        let w = c
            .write_records("web", &batch, |i, sink| {
                if i == 0 {
                    for _ in 0..5 {
                        sink.write(&[1u8; 1 << 19])?;
                    }
                    Ok(())
                } else {
                    sink.write(&[1, 2, 3])
                }
            })
            .unwrap();
        assert_eq!(w.generation, expect.len() as u64);

        // A payload longer than declared is refused before it is sent.
        let e = c
            .write_records("web", &batch, |_, sink| sink.write(&vec![0u8; 6 << 20]))
            .unwrap_err();
        assert!(e.to_string().contains("more than"), "{e}");
        t.join().unwrap();
    }

    #[test]
    fn a_stream_whose_checksum_differs_is_an_error_at_its_end() {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("ctl.sock");
        let t = server(&sock, 1);
        let c = Client::new(&sock).unwrap();
        // Build the reader on a path the test server corrupts.
        let path = format!("/bad{}", record_path("web", RecordType::MemoryImage, 0));
        let ep = c.endpoint.clone();
        let resp =
            c.rt.block_on(async move {
                let body = ReqBody::Full(Full::new(Bytes::new()));
                Client::send(ep, Method::GET, path, "", body).await
            })
            .unwrap();
        let sum =
            blake3::Hash::from_hex(resp.headers().get(BLAKE3_HEADER).unwrap().to_str().unwrap())
                .unwrap();
        let mut r = RecordReader {
            client: &c,
            what: "test".into(),
            body: resp.into_body(),
            buf: Bytes::new(),
            len: 3 << 20,
            got: 0,
            hasher: blake3::Hasher::new(),
            sum,
        };
        let mut got = Vec::new();
        let e = r.read_to_end(&mut got).unwrap_err();
        assert!(e.to_string().contains("does not match"), "{e}");
        t.join().unwrap();
    }

    #[test]
    fn names_are_percent_encoded() {
        assert_eq!(encode("snap 1/x"), "snap%201%2Fx");
        assert_eq!(encode("a-b_c.d~"), "a-b_c.d~");
        assert_eq!(
            record_path("web 1", RecordType::MemoryImage, 3),
            "/v1/luns/web%201/records/memory-image/3"
        );
    }
}
