//! Transmission phase of one connection.
//!
//! One reader loop decodes requests and spawns one task per request; tasks
//! run concurrently and finish in any order; one writer task batches their
//! replies into few syscalls (header and small payloads copied into one
//! buffer, large payloads written straight from the engine's `Bytes`).
//! Requests in flight are bounded in bytes: while over the bound the reader
//! stops reading, which pushes back on the client through TCP.
//!
//! A request goes to the top of its export's block-device stack
//! ([`Export::dev`], the region view) in export offsets; the region checks
//! the range and translates it, the LUN's live-switch gate below it parks
//! the request during a switch (see [`crate::switch`]). This module only
//! adds the protocol's rules (flags, block sizes, read-only) and never
//! computes a LUN offset itself.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, Notify};
use tokio_util::codec::Decoder;
use tokio_util::sync::CancellationToken;

use super::codec::{ChunkPayload, CodecError, Reply, RequestCodec, RequestFrame, RequestHeader};
use super::handshake::Negotiated;
use super::proto::{cmd_flags, reply_flags, state, Command, NbdError, BASE_ALLOCATION_ID};
use super::transport::{BoxWriter, Transport};
use crate::export::{Export, ExportStats, RangeError};
use lungate_block::Chunk;

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

    /// An I/O error from the stack. A range the region view refused is
    /// ENOSPC for writes past the end (the spec's SHOULD), else EINVAL.
    fn io(what: &str, e: &std::io::Error, writing: bool) -> Self {
        if let Some(r) = lungate_block::device::range_error(e) {
            let error = if writing {
                NbdError::NoSpc
            } else {
                NbdError::Inval
            };
            return Failure::new(error, r.to_string());
        }
        Failure::new(NbdError::from_io(e), format!("{what}: {e}"))
    }

    /// Block-size rule violations: EINVAL.
    fn range(e: RangeError) -> Self {
        Failure::new(NbdError::Inval, e.to_string())
    }
}

/// Serve requests until DISC, EOF, an unrecoverable framing error, or
/// server shutdown. In-flight requests always finish and get their replies
/// before this returns.
pub async fn serve(
    io: Transport,
    buffered: BytesMut,
    negotiated: Negotiated,
    max_in_flight: u64,
    shutdown: CancellationToken,
) -> Result<End, SessionError> {
    let ctx = Arc::new(Ctx {
        export: negotiated.export,
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
                let f = Failure::range(RangeError::TooLong {
                    length: u64::from(header.length),
                    maximum: ctx.export.block.maximum,
                });
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
        let (ctx2, tx2) = (ctx.clone(), tx.clone());
        tokio::spawn(async move {
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
    let dev = &e.dev;
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
    let payload_carrying = matches!(h.command, Command::Read | Command::Write | Command::Cache);
    if !matches!(
        h.command,
        Command::Flush | Command::Disc | Command::Unknown(_)
    ) {
        e.check_block_sizes(offset, length, payload_carrying)
            .map_err(Failure::range)?;
    }
    match h.command {
        Command::Read => read(ctx, tx, h, credit).await.map(|()| true),
        Command::Write => {
            let data = payload.unwrap_or_default();
            dev.write(offset, data, fua)
                .await
                .map_err(|err| Failure::io("write", &err, true))?;
            Ok(false)
        }
        Command::Flush => {
            dev.flush()
                .await
                .map_err(|err| Failure::io("flush", &err, false))?;
            Ok(false)
        }
        Command::Trim => {
            if let Err(err) = dev.trim(offset, length).await {
                // Trim is advisory: a backing store that cannot punch
                // holes simply keeps the data.
                if err.raw_os_error() != Some(libc::EOPNOTSUPP) {
                    return Err(Failure::io("trim", &err, false));
                }
            }
            if fua && length > 0 {
                dev.flush()
                    .await
                    .map_err(|err| Failure::io("flush after trim", &err, false))?;
            }
            Ok(false)
        }
        Command::WriteZeroes => {
            let no_hole = h.flags & cmd_flags::NO_HOLE != 0;
            if h.flags & cmd_flags::FAST_ZERO != 0 && no_hole {
                // Allocating zeroes may cost as much as writing them.
                return Err(Failure::new(
                    NbdError::NotSup,
                    "fast zero with NO_HOLE is not guaranteed fast",
                ));
            }
            dev.write_zeroes(offset, length, !no_hole)
                .await
                .map_err(|err| Failure::io("write zeroes", &err, true))?;
            if fua && length > 0 {
                dev.flush()
                    .await
                    .map_err(|err| Failure::io("flush after write zeroes", &err, false))?;
            }
            Ok(false)
        }
        Command::Cache => {
            // Through the stack: the layer that holds each cluster reads
            // it ahead. A hint; failing to take it is not an error.
            if let Err(err) = dev.cache(offset, length).await {
                if lungate_block::device::range_error(&err).is_some() {
                    return Err(Failure::io("cache", &err, false));
                }
                tracing::debug!(error = %err, "cache hint ignored");
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
            let extents = dev
                .extents(offset, length)
                .await
                .map_err(|err| Failure::io("block status", &err, false))?;
            let mut descs: Vec<(u32, u32)> = extents
                .into_iter()
                .map(|x| {
                    let flags = if x.data { 0 } else { state::HOLE | state::ZERO };
                    (x.length as u32, flags)
                })
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

async fn read(ctx: &Ctx, tx: &Tx, h: &RequestHeader, credit: u64) -> Result<(), Failure> {
    let dev = &ctx.export.dev;
    let length = u64::from(h.length);
    if length == 0 {
        // Still a range check: an empty read past the end is refused.
        dev.read(h.offset, 0)
            .await
            .map_err(|err| Failure::io("read", &err, false))?;
        send_ok(ctx, tx, h, credit);
        return Ok(());
    }
    let sparse = ctx.structured && h.flags & cmd_flags::DF == 0 && length >= SPARSE_READ_MIN;
    if sparse {
        // One call, one consistent view: the stack says where it holds
        // zeros, and those go out as OFFSET_HOLE chunks. All data is in
        // hand before the first chunk goes out, so an I/O error becomes one
        // error reply instead of a half-sent read.
        let chunks = dev
            .read_chunks(h.offset, h.length as usize)
            .await
            .map_err(|err| Failure::io("read", &err, false))?;
        return send_chunks(tx, h, chunks, credit);
    }
    let data = dev
        .read(h.offset, h.length as usize)
        .await
        .map_err(|err| Failure::io("read", &err, false))?;
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

/// A structured read as chunks: holes of at least [`MIN_HOLE_CHUNK`] as
/// OFFSET_HOLE, shorter ones sent as zeros with the data around them.
fn send_chunks(tx: &Tx, h: &RequestHeader, chunks: Vec<Chunk>, credit: u64) -> Result<(), Failure> {
    let mut out: Vec<ChunkPayload> = Vec::with_capacity(chunks.len());
    let mut data: Option<(u64, BytesMut)> = None;
    let flush_data = |data: &mut Option<(u64, BytesMut)>, out: &mut Vec<ChunkPayload>| {
        if let Some((offset, b)) = data.take() {
            out.push(ChunkPayload::OffsetData {
                offset,
                data: b.freeze(),
            });
        }
    };
    for c in chunks {
        match c {
            Chunk::Hole { offset, length } if length >= MIN_HOLE_CHUNK => {
                flush_data(&mut data, &mut out);
                out.push(ChunkPayload::OffsetHole {
                    offset,
                    length: length as u32,
                });
            }
            c => {
                let (offset, bytes): (u64, &[u8]) = match &c {
                    Chunk::Data { offset, data } => (*offset, data),
                    Chunk::Hole { offset, length } => (*offset, &ZERO_CHUNK[..*length as usize]),
                };
                match &mut data {
                    Some((_, b)) => b.extend_from_slice(bytes),
                    None => data = Some((offset, BytesMut::from(bytes))),
                }
            }
        }
    }
    flush_data(&mut data, &mut out);
    let n = out.len();
    for (i, payload) in out.into_iter().enumerate() {
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

/// Zeros for holes too short to send as holes.
static ZERO_CHUNK: [u8; MIN_HOLE_CHUNK as usize] = [0; MIN_HOLE_CHUNK as usize];
