//! Transmission phase of one connection.
//!
//! One reader loop decodes requests and spawns one task per request; tasks
//! run concurrently and finish in any order; one writer task batches their
//! replies into few syscalls (header and small payloads copied into one
//! buffer, large payloads written straight from the engine's `Bytes`).
//! Requests in flight are bounded in bytes: while over the bound the reader
//! stops reading, which pushes back on the client through TCP.
//!
//! Every offset goes through [`Export::locate_checked`] before the LUN
//! sees it; this module never computes a file offset itself. Each request
//! takes its place at the LUN's live-switch gate in the order the reader
//! decoded it (see [`crate::switch`]) and holds its pass while it runs.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use lungate_block::engine::IoEngine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, Notify};
use tokio_util::codec::Decoder;
use tokio_util::sync::CancellationToken;

use super::codec::{ChunkPayload, CodecError, Reply, RequestCodec, RequestFrame, RequestHeader};
use super::handshake::Negotiated;
use super::proto::{cmd_flags, reply_flags, state, Command, NbdError, BASE_ALLOCATION_ID};
use super::transport::{BoxWriter, Transport};
use crate::export::{Export, ExportStats, RangeError};

/// Payloads up to this size are copied into the batch buffer; larger ones
/// are written from their own buffer.
const COPY_LIMIT: usize = 32 * 1024;
/// Write the batch buffer out once it holds this much.
const FLUSH_AT: usize = 256 * 1024;
/// Per-request charge on top of its data, so payload-less requests are
/// bounded too.
const REQUEST_OVERHEAD: u64 = 4096;
/// Reads at least this long look for holes to send as OFFSET_HOLE chunks.
const SPARSE_READ_MIN: u64 = 128 * 1024;
/// Too-long WRITE payloads up to this length are read and discarded (the
/// spec: lengths under 32 MiB SHOULD NOT be treated as denial of service);
/// longer ones get EINVAL and end the session.
const WRITE_SKIP_LIMIT: u32 = 64 * 1024 * 1024;
/// Holes shorter than this are read as data.
const MIN_HOLE_CHUNK: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("reply writer task failed: {0}")]
    Writer(String),
}

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// NBD_CMD_DISC.
    Disconnect,
    /// The client closed the connection without DISC.
    Eof,
    /// The server is shutting down.
    Shutdown,
    /// The client sent a WRITE too long to skip; it got EINVAL and the
    /// connection was closed.
    AbsurdWrite,
}

/// Per-connection bound on bytes in flight.
struct InFlight {
    used: AtomicU64,
    max: u64,
    notify: Notify,
    closed: AtomicBool,
}

impl InFlight {
    fn new(max: u64) -> Self {
        InFlight {
            used: AtomicU64::new(0),
            max,
            notify: Notify::new(),
            closed: AtomicBool::new(false),
        }
    }

    /// Charge `n` bytes, waiting while over the bound. Only the reader
    /// acquires, so check-then-add cannot race with another acquirer.
    /// `false` once the writer is gone.
    async fn acquire(&self, n: u64) -> bool {
        loop {
            if self.closed.load(Ordering::Acquire) {
                return false;
            }
            let used = self.used.load(Ordering::Acquire);
            if used == 0 || used + n <= self.max {
                self.used.fetch_add(n, Ordering::AcqRel);
                return true;
            }
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let used = self.used.load(Ordering::Acquire);
            if self.closed.load(Ordering::Acquire) || used == 0 || used + n <= self.max {
                continue;
            }
            notified.await;
        }
    }

    fn release(&self, n: u64) {
        if n > 0 {
            self.used.fetch_sub(n, Ordering::AcqRel);
            self.notify.notify_one();
        }
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.notify.notify_one();
    }
}

/// One message for the writer, with the in-flight bytes to release once
/// it is on the wire.
struct Outgoing {
    reply: Reply,
    credit: u64,
}

type Tx = mpsc::UnboundedSender<Outgoing>;

struct Ctx {
    export: Arc<Export>,
    engine: IoEngine,
    structured: bool,
    base_allocation: bool,
    inflight: InFlight,
}

/// A failed request: NBD error plus a message for structured replies.
struct Failure {
    error: NbdError,
    message: String,
}

impl Failure {
    fn new(error: NbdError, message: impl Into<String>) -> Self {
        Failure {
            error,
            message: message.into(),
        }
    }

    fn io(what: &str, e: &std::io::Error) -> Self {
        Failure::new(NbdError::from_io(e), format!("{what}: {e}"))
    }

    /// Range errors: writes past the end are ENOSPC (the spec's SHOULD),
    /// everything else EINVAL.
    fn range(e: RangeError, writing: bool) -> Self {
        let error = match e {
            RangeError::OutOfBounds { .. } | RangeError::Overflow { .. } if writing => {
                NbdError::NoSpc
            }
            _ => NbdError::Inval,
        };
        Failure::new(error, e.to_string())
    }
}

/// Serve requests until DISC, EOF, an unrecoverable framing error, or
/// server shutdown. In-flight requests always finish and get their replies
/// before this returns.
pub async fn serve(
    io: Transport,
    buffered: BytesMut,
    negotiated: Negotiated,
    engine: IoEngine,
    max_in_flight: u64,
    shutdown: CancellationToken,
) -> Result<End, SessionError> {
    let ctx = Arc::new(Ctx {
        export: negotiated.export,
        engine,
        structured: negotiated.structured,
        base_allocation: negotiated.base_allocation,
        inflight: InFlight::new(max_in_flight),
    });
    let (mut reader, writer) = io.split();
    let (tx, rx) = mpsc::unbounded_channel();
    let writer = tokio::spawn(write_replies(writer, rx, ctx.clone()));

    let mut codec = RequestCodec::new(ctx.export.block.maximum, WRITE_SKIP_LIMIT);
    let mut buf = buffered;
    let result: Result<End, SessionError> = loop {
        let frame = match codec.decode(&mut buf) {
            Ok(Some(f)) => f,
            Ok(None) => {
                if buf.capacity() - buf.len() < 16 * 1024 {
                    buf.reserve(256 * 1024);
                }
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => break Ok(End::Shutdown),
                    n = reader.read_buf(&mut buf) => match n {
                        Ok(0) => break Ok(End::Eof),
                        Ok(_) => continue,
                        Err(e) => break Err(e.into()),
                    },
                }
            }
            Err(e) => break Err(e.into()),
        };
        let (header, payload) = match frame {
            RequestFrame::Request { header, payload } => (header, payload),
            RequestFrame::OversizedWrite { header } => {
                let f = Failure::range(
                    RangeError::TooLong {
                        length: u64::from(header.length),
                        maximum: ctx.export.block.maximum,
                    },
                    true,
                );
                send_failure(&ctx, &tx, &header, f, 0);
                continue;
            }
            RequestFrame::AbsurdWrite { header } => {
                let f = Failure::new(
                    NbdError::Inval,
                    format!(
                        "write length {} is beyond the {WRITE_SKIP_LIMIT}-byte limit; closing the connection",
                        header.length
                    ),
                );
                send_failure(&ctx, &tx, &header, f, 0);
                break Ok(End::AbsurdWrite);
            }
        };
        if header.command == Command::Disc {
            break Ok(End::Disconnect);
        }
        let data = match header.command {
            Command::Read | Command::Write => u64::from(header.length),
            _ => 0,
        };
        let credit = REQUEST_OVERHEAD + data.min(u64::from(ctx.export.block.maximum));
        if !ctx.inflight.acquire(credit).await {
            break Ok(End::Eof); // the writer died: the client is gone
        }
        let entry = ctx.export.lun.as_ref().map(|l| l.gate.enter());
        let (ctx2, tx2) = (ctx.clone(), tx.clone());
        tokio::spawn(async move {
            let _pass = match entry {
                Some(e) => Some(e.ready().await),
                None => None,
            };
            handle(&ctx2, &tx2, header, payload, credit).await;
        });
    };
    drop(tx);
    let written = writer
        .await
        .map_err(|e| SessionError::Writer(e.to_string()))?;
    match (result, written) {
        (Err(e), _) => Err(e),
        (Ok(end), Ok(())) => Ok(end),
        // A client that sent DISC or hung up may close before its last
        // replies; that is not a server error.
        (Ok(End::Disconnect | End::Eof | End::AbsurdWrite), Err(_)) => Ok(End::Eof),
        (Ok(End::Shutdown), Err(e)) => Err(e.into()),
    }
}

async fn write_replies(
    mut w: BoxWriter,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    ctx: Arc<Ctx>,
) -> std::io::Result<()> {
    let mut buf = BytesMut::with_capacity(FLUSH_AT + COPY_LIMIT);
    let res = async {
        while let Some(first) = rx.recv().await {
            let mut next = Some(first);
            let mut credit = 0;
            while let Some(m) = next.take() {
                credit += m.credit;
                let tail = RequestCodec::encode_split(&m.reply, &mut buf, COPY_LIMIT)
                    .map_err(std::io::Error::other)?;
                if let Some(data) = tail {
                    w.write_all(&buf).await?;
                    buf.clear();
                    w.write_all(&data).await?;
                } else if buf.len() >= FLUSH_AT {
                    w.write_all(&buf).await?;
                    buf.clear();
                }
                next = rx.try_recv().ok();
            }
            if !buf.is_empty() {
                w.write_all(&buf).await?;
                buf.clear();
            }
            w.flush().await?;
            ctx.inflight.release(credit);
        }
        w.shutdown().await
    }
    .await;
    if res.is_err() {
        ctx.inflight.close();
    }
    res
}

fn send(tx: &Tx, reply: Reply, credit: u64) {
    // A send fails only when the writer is gone; the reader notices that.
    let _ = tx.send(Outgoing { reply, credit });
}

fn send_failure(ctx: &Ctx, tx: &Tx, h: &RequestHeader, f: Failure, credit: u64) {
    tracing::debug!(command = ?h.command, offset = h.offset, length = h.length, error = ?f.error, message = %f.message, "request failed");
    let reply = if ctx.structured {
        Reply::Chunk {
            handle: h.handle,
            flags: reply_flags::DONE,
            payload: ChunkPayload::Error {
                error: f.error.code(),
                message: f.message,
            },
        }
    } else {
        Reply::Simple {
            handle: h.handle,
            error: f.error.code(),
            data: None,
        }
    };
    send(tx, reply, credit);
}

fn send_ok(ctx: &Ctx, tx: &Tx, h: &RequestHeader, credit: u64) {
    let reply = if ctx.structured && h.command == Command::Read {
        Reply::Chunk {
            handle: h.handle,
            flags: reply_flags::DONE,
            payload: ChunkPayload::None,
        }
    } else {
        // Simple replies are allowed for payload-less success even with
        // structured replies, and are the shortest.
        Reply::Simple {
            handle: h.handle,
            error: 0,
            data: None,
        }
    };
    send(tx, reply, credit);
}

async fn handle(ctx: &Ctx, tx: &Tx, h: RequestHeader, payload: Option<Bytes>, credit: u64) {
    let st = &ctx.export.stats;
    ExportStats::add(&st.in_flight, 1);
    let r = run(ctx, tx, &h, payload, credit).await;
    ExportStats::sub(&st.in_flight, 1);
    match (&r, h.command) {
        (Err(_), _) => ExportStats::add(&st.errors, 1),
        (Ok(_), Command::Read) => {
            ExportStats::add(&st.reads, 1);
            ExportStats::add(&st.bytes_read, u64::from(h.length));
        }
        (Ok(_), Command::Write | Command::WriteZeroes | Command::Trim) => {
            ExportStats::add(&st.writes, 1);
            if h.command == Command::Write {
                ExportStats::add(&st.bytes_written, u64::from(h.length));
            }
        }
        _ => {}
    }
    match r {
        Ok(true) => {}
        Ok(false) => send_ok(ctx, tx, &h, credit),
        Err(f) => send_failure(ctx, tx, &h, f, credit),
    }
}

// The data path: through the served LUN (fast path or volume), or straight
// to the engine for a bare file view.
impl Ctx {
    async fn read_at(&self, at: u64, len: usize) -> std::io::Result<Bytes> {
        match &self.export.lun {
            Some(l) => l.read(&self.engine, at, len).await,
            None => self.engine.read(&self.export.file, at, len).await,
        }
    }
    async fn write_at(&self, at: u64, data: Bytes, fua: bool) -> std::io::Result<()> {
        match &self.export.lun {
            Some(l) => l.write(&self.engine, at, data, fua).await,
            None => self.engine.write(&self.export.file, at, data, fua).await,
        }
    }
    async fn flush(&self) -> std::io::Result<()> {
        match &self.export.lun {
            Some(l) => l.flush(&self.engine).await,
            None => self.engine.flush(&self.export.file).await,
        }
    }
    async fn trim(&self, at: u64, len: u64) -> std::io::Result<()> {
        match &self.export.lun {
            Some(l) => l.trim(&self.engine, at, len).await,
            None => self.engine.punch_hole(&self.export.file, at, len).await,
        }
    }
    async fn write_zeroes(&self, at: u64, len: u64, may_trim: bool) -> std::io::Result<()> {
        match &self.export.lun {
            Some(l) => l.write_zeroes(&self.engine, at, len, may_trim).await,
            None => {
                self.engine
                    .write_zeroes(&self.export.file, at, len, may_trim)
                    .await
            }
        }
    }
    async fn extents(
        &self,
        at: u64,
        len: u64,
    ) -> std::io::Result<Vec<lungate_block::engine::Extent>> {
        match &self.export.lun {
            Some(l) => l.extents(&self.engine, at, len).await,
            None => self.engine.extents(&self.export.file, at, len),
        }
    }
}

/// Execute one request. `Ok(true)`: replies already sent; `Ok(false)`:
/// success without payload, caller replies.
async fn run(
    ctx: &Ctx,
    tx: &Tx,
    h: &RequestHeader,
    payload: Option<Bytes>,
    credit: u64,
) -> Result<bool, Failure> {
    let e = &ctx.export;
    let extra = h.flags & !h.command.allowed_flags();
    if extra != 0 {
        return Err(Failure::new(
            NbdError::Inval,
            format!(
                "command flags {:#x} are not valid for {:?}",
                extra, h.command
            ),
        ));
    }
    if h.flags & cmd_flags::DF != 0 && !ctx.structured {
        return Err(Failure::new(
            NbdError::Inval,
            "NBD_CMD_FLAG_DF without structured replies",
        ));
    }
    let fua = h.flags & cmd_flags::FUA != 0;
    let (offset, length) = (h.offset, u64::from(h.length));
    let writing = matches!(
        h.command,
        Command::Write | Command::Trim | Command::WriteZeroes
    );
    if writing && e.read_only {
        return Err(Failure::new(
            NbdError::Perm,
            format!("export {:?} is read-only", e.name),
        ));
    }
    match h.command {
        Command::Read => {
            let at = e
                .locate_checked(offset, length, true)
                .map_err(|r| Failure::range(r, false))?;
            read(ctx, tx, h, at, credit).await.map(|()| true)
        }
        Command::Write => {
            let at = e
                .locate_checked(offset, length, true)
                .map_err(|r| Failure::range(r, true))?;
            let data = payload.unwrap_or_default();
            if !data.is_empty() {
                ctx.write_at(at, data, fua)
                    .await
                    .map_err(|err| Failure::io("write", &err))?;
            }
            Ok(false)
        }
        Command::Flush => {
            ctx.flush()
                .await
                .map_err(|err| Failure::io("flush", &err))?;
            Ok(false)
        }
        Command::Trim => {
            let at = e
                .locate_checked(offset, length, false)
                .map_err(|r| Failure::range(r, false))?;
            if length > 0 {
                if let Err(err) = ctx.trim(at, length).await {
                    // Trim is advisory: a backing store that cannot punch
                    // holes simply keeps the data.
                    if err.raw_os_error() != Some(libc::EOPNOTSUPP) {
                        return Err(Failure::io("trim", &err));
                    }
                }
                if fua {
                    ctx.flush()
                        .await
                        .map_err(|err| Failure::io("flush after trim", &err))?;
                }
            }
            Ok(false)
        }
        Command::WriteZeroes => {
            let at = e
                .locate_checked(offset, length, false)
                .map_err(|r| Failure::range(r, true))?;
            let no_hole = h.flags & cmd_flags::NO_HOLE != 0;
            if h.flags & cmd_flags::FAST_ZERO != 0 && no_hole {
                // Allocating zeroes may cost as much as writing them.
                return Err(Failure::new(
                    NbdError::NotSup,
                    "fast zero with NO_HOLE is not guaranteed fast",
                ));
            }
            if length > 0 {
                ctx.write_zeroes(at, length, !no_hole)
                    .await
                    .map_err(|err| Failure::io("write zeroes", &err))?;
                if fua {
                    ctx.flush()
                        .await
                        .map_err(|err| Failure::io("flush after write zeroes", &err))?;
                }
            }
            Ok(false)
        }
        Command::Cache => {
            let at = e
                .locate_checked(offset, length, true)
                .map_err(|r| Failure::range(r, false))?;
            if length > 0 {
                // SAFETY: posix_fadvise only reads its integer arguments; the
                // fd is owned by `e.file`, which outlives this call.
                let rc = unsafe {
                    libc::posix_fadvise(
                        e.file.as_raw_fd(),
                        at as libc::off_t,
                        length as libc::off_t,
                        libc::POSIX_FADV_WILLNEED,
                    )
                };
                if rc != 0 {
                    tracing::debug!(rc, "posix_fadvise(WILLNEED) failed; cache hint ignored");
                }
            }
            Ok(false)
        }
        Command::BlockStatus => {
            if !ctx.structured || !ctx.base_allocation {
                return Err(Failure::new(
                    NbdError::Inval,
                    "NBD_CMD_BLOCK_STATUS without a negotiated metadata context",
                ));
            }
            if length == 0 {
                return Err(Failure::new(NbdError::Inval, "block status of length 0"));
            }
            let at = e
                .locate_checked(offset, length, false)
                .map_err(|r| Failure::range(r, false))?;
            let extents = allocation(ctx, at, offset, length).await?;
            let mut descs: Vec<(u32, u32)> = extents
                .into_iter()
                .map(|(len, hole)| (len as u32, if hole { state::HOLE | state::ZERO } else { 0 }))
                .collect();
            if h.flags & cmd_flags::REQ_ONE != 0 {
                descs.truncate(1);
            }
            send(
                tx,
                Reply::Chunk {
                    handle: h.handle,
                    flags: reply_flags::DONE,
                    payload: ChunkPayload::BlockStatus {
                        context: BASE_ALLOCATION_ID,
                        extents: descs,
                    },
                },
                credit,
            );
            Ok(true)
        }
        Command::Disc => Ok(false), // handled by the reader; never spawned
        Command::Unknown(c) => Err(Failure::new(
            NbdError::Inval,
            format!("unknown command {c}"),
        )),
    }
}

/// Allocation of export range `[offset, offset + length)` (file offset
/// `at`) as consecutive `(length, is_hole)` runs covering it exactly.
/// Gaps the engine does not describe are reported as data.
async fn allocation(
    ctx: &Ctx,
    at: u64,
    offset: u64,
    length: u64,
) -> Result<Vec<(u64, bool)>, Failure> {
    let e = &ctx.export;
    let end = offset + length; // locate proved this fits
    let raw = ctx
        .extents(at, length)
        .await
        .map_err(|err| Failure::io("block status", &err))?;
    let mut runs: Vec<(u64, bool)> = Vec::new();
    let mut pos = offset;
    let push = |runs: &mut Vec<(u64, bool)>, len: u64, hole: bool| match runs.last_mut() {
        Some((l, h)) if *h == hole => *l += len,
        _ => runs.push((len, hole)),
    };
    for x in raw {
        let Some((o, l)) = e.clip_file_range(x.offset, x.length, offset, end) else {
            continue;
        };
        if o < pos {
            continue; // overlapping or unsorted extent: keep what we have
        }
        if o > pos {
            push(&mut runs, o - pos, false);
        }
        push(&mut runs, l, !x.data);
        pos = o + l;
    }
    if pos < end {
        push(&mut runs, end - pos, false);
    }
    Ok(runs)
}

async fn read(ctx: &Ctx, tx: &Tx, h: &RequestHeader, at: u64, credit: u64) -> Result<(), Failure> {
    let length = u64::from(h.length);
    if length == 0 {
        send_ok(ctx, tx, h, credit);
        return Ok(());
    }
    let sparse = ctx.structured && h.flags & cmd_flags::DF == 0 && length >= SPARSE_READ_MIN;
    if sparse {
        let runs = allocation(ctx, at, h.offset, length).await?;
        if runs.iter().any(|(l, hole)| *hole && *l >= MIN_HOLE_CHUNK) {
            return read_sparse(ctx, tx, h, at, runs, credit).await;
        }
    }
    let data = ctx
        .read_at(at, h.length as usize)
        .await
        .map_err(|err| Failure::io("read", &err))?;
    let reply = if ctx.structured {
        Reply::Chunk {
            handle: h.handle,
            flags: reply_flags::DONE,
            payload: ChunkPayload::OffsetData {
                offset: h.offset,
                data,
            },
        }
    } else {
        Reply::Simple {
            handle: h.handle,
            error: 0,
            data: Some(data),
        }
    };
    send(tx, reply, credit);
    Ok(())
}

/// Structured read that sends holes as OFFSET_HOLE. All data is read
/// before the first chunk goes out, so an I/O error becomes one error
/// reply instead of a half-sent read.
async fn read_sparse(
    ctx: &Ctx,
    tx: &Tx,
    h: &RequestHeader,
    at: u64,
    runs: Vec<(u64, bool)>,
    credit: u64,
) -> Result<(), Failure> {
    // Short holes are merged into the data around them.
    let mut segs: Vec<(u64, u64, bool)> = Vec::new(); // (export offset, len, hole)
    let mut pos = h.offset;
    for (len, hole) in runs {
        let hole = hole && len >= MIN_HOLE_CHUNK;
        match segs.last_mut() {
            Some((_, l, hh)) if *hh == hole => *l += len,
            _ => segs.push((pos, len, hole)),
        }
        pos += len;
    }
    let mut chunks = Vec::with_capacity(segs.len());
    for (off, len, hole) in segs {
        if hole {
            chunks.push(ChunkPayload::OffsetHole {
                offset: off,
                length: len as u32,
            });
        } else {
            let data = ctx
                .read_at(at + (off - h.offset), len as usize)
                .await
                .map_err(|err| Failure::io("read", &err))?;
            chunks.push(ChunkPayload::OffsetData { offset: off, data });
        }
    }
    let n = chunks.len();
    for (i, payload) in chunks.into_iter().enumerate() {
        let last = i + 1 == n;
        send(
            tx,
            Reply::Chunk {
                handle: h.handle,
                flags: if last { reply_flags::DONE } else { 0 },
                payload,
            },
            if last { credit } else { 0 },
        );
    }
    Ok(())
}
