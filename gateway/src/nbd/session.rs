//! Transmission phase of one connection.
//!
//! One reader loop decodes request headers, checks each request's protocol
//! rules once ([`prepare`]: flags, block sizes, read-only), and spawns one
//! task per request; tasks run concurrently and finish in any order; one
//! writer task ([`super::writer`]) puts their replies on the wire. A
//! request goes to the top of its export's block-device stack
//! ([`Export::dev`], the region view) in export offsets; the region checks
//! the range and translates it, the LUN's live-switch gate below it parks
//! the request during a switch (see [`crate::switch`]). This module never
//! computes a LUN offset itself.
//!
//! Memory: before it reads a request's payload or starts the request, the
//! reader charges it to the connection's account ([`ConnMemory`]), which
//! waits while the connection is at `max_in_flight` or the gateway at
//! `max_memory`. The charge stays until the request's last reply bytes are
//! written, so a client that does not read its replies stops being read
//! (TCP pushes back on it) instead of growing the gateway. No request holds
//! more than [`STREAM_WINDOW`] bytes of data at once: a longer WRITE's
//! payload is read from the socket and written to the export a
//! [`PIECE`] at a time, a longer READ's reply is read and sent a piece at a
//! time (OFFSET_DATA chunks, or one simple reply whose data follows in
//! pieces).
//!
//! Every call into the stack takes its own place at the gate, so a streamed
//! request holds a pass only for one piece's I/O at a time and a client
//! slow to send a payload or to read a reply never holds up a switch.
//! Requests of one connection whose ranges overlap, one of them a write,
//! run in arrival order ([`InOrder`]); a request waits for the earlier ones
//! before it calls into the stack.

use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use lungate_block::Chunk;
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::codec::Decoder;
use tokio_util::sync::CancellationToken;

use super::codec::{ChunkPayload, CodecError, Reply, RequestCodec, RequestHeader};
use super::handshake::{MetaContext, Negotiated, Selected};
use super::proto::{cmd_flags, reply_flags, state, Command, NbdError};
use super::transport::{BoxReader, Transport};
use super::writer::{write_replies, Hold, Outgoing, Tx, WriterError};
use crate::export::{Export, ExportStats, RangeError};
use crate::memory::{ConnMemory, Credit, PIECE, REQUEST_OVERHEAD, STREAM_WINDOW};

/// Reads at least this long look for holes to send as OFFSET_HOLE chunks.
const SPARSE_READ_MIN: u64 = 128 * 1024;
/// Holes shorter than this are read as data.
const MIN_HOLE_CHUNK: u64 = 4096;
/// Socket read-ahead between requests.
const READ_AHEAD: usize = 256 * 1024;
/// Most of the export one BLOCK_STATUS looks at: 4 GiB with compact
/// headers (32-bit descriptors), 64 GiB with extended ones (a 64-bit effect
/// length can name a whole disk). The reply may cover less than asked, and
/// clients ask again from where it stopped.
const BLOCK_STATUS_SPAN: u64 = 1 << 32;
const BLOCK_STATUS_SPAN_EXTENDED: u64 = 1 << 36;
/// The longest compact descriptor: 4 GiB less 512 bytes, a multiple of 512
/// (the spec's SHOULD).
const MAX_COMPACT_RUN: u32 = u32::MAX - 511;
/// Most descriptors one block-status chunk carries (the spec's SHOULD).
const MAX_DESCRIPTORS: usize = 1 << 20;
/// `qemu:dirty-bitmap` flag: the extent changed since the snapshot.
const STATE_DIRTY: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Writer(#[from] WriterError),
    #[error("reply writer task failed: {0}")]
    WriterTask(String),
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
    /// The client sent a payload too long to skip; it got EINVAL and the
    /// connection was closed.
    AbsurdWrite,
}

struct Ctx {
    export: Arc<Export>,
    /// Structured replies (or extended headers, which imply them).
    structured: bool,
    extended: bool,
    /// Metadata contexts selected in the handshake, in reply order.
    contexts: Vec<Selected>,
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
            return Failure::range_of(r, writing);
        }
        Failure::new(NbdError::from_io(e), format!("{what}: {e}"))
    }

    fn range_of(r: &lungate_block::device::RangeError, writing: bool) -> Self {
        let error = if writing {
            NbdError::NoSpc
        } else {
            NbdError::Inval
        };
        Failure::new(error, r.to_string())
    }

    /// Block-size rule violations: EINVAL.
    fn range(e: RangeError) -> Self {
        Failure::new(NbdError::Inval, e.to_string())
    }
}

/// What a request is charged: its data up to the streaming window, plus
/// the fixed overhead.
fn charge(h: &RequestHeader) -> u64 {
    let data = match h.command {
        Command::Read => h.length,
        _ => h.payload,
    };
    REQUEST_OVERHEAD + data.min(STREAM_WINDOW)
}

/// Keeps one connection's overlapping requests in arrival order: a request
/// whose range overlaps an earlier one still running, where either writes,
/// waits for it to finish. The spec lets a server reorder such requests;
/// keeping them in order costs little and gives a client (and
/// nbd-tester-client's `-l` mode) what a disk would.
#[derive(Default)]
struct InOrder {
    running: std::sync::Mutex<Vec<Running>>,
    next: std::sync::atomic::AtomicU64,
}

struct Running {
    id: u64,
    start: u64,
    end: u64,
    write: bool,
    done: tokio::sync::watch::Receiver<()>,
}

/// A registered request; dropping it lets the requests behind it go.
struct Ticket {
    order: Arc<InOrder>,
    id: u64,
    _done: tokio::sync::watch::Sender<()>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut r = self.order.running.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = r.iter().position(|x| x.id == self.id) {
            r.swap_remove(i);
        }
    }
}

impl InOrder {
    /// Register `[start, start + len)`; returns the ticket and what to wait
    /// for first.
    fn register(
        self: &Arc<Self>,
        start: u64,
        len: u64,
        write: bool,
    ) -> (Ticket, Vec<tokio::sync::watch::Receiver<()>>) {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let end = start.saturating_add(len);
        let (tx, rx) = tokio::sync::watch::channel(());
        let mut r = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let deps = r
            .iter()
            .filter(|x| (write || x.write) && x.start < end && start < x.end)
            .map(|x| x.done.clone())
            .collect();
        r.push(Running {
            id,
            start,
            end,
            write,
            done: rx,
        });
        let ticket = Ticket {
            order: self.clone(),
            id,
            _done: tx,
        };
        (ticket, deps)
    }
}

/// What the ordering needs of a request: its export range and whether it
/// writes. `None` for requests that touch no range.
fn range_of(h: &RequestHeader) -> Option<(u64, u64, bool)> {
    let write = match h.command {
        Command::Write | Command::Trim | Command::WriteZeroes => true,
        Command::Read | Command::BlockStatus | Command::Cache => false,
        _ => return None,
    };
    (h.length > 0).then_some((h.offset, h.length, write))
}

/// Wait for the earlier overlapping requests a request depends on.
async fn after(deps: Vec<tokio::sync::watch::Receiver<()>>) {
    for mut d in deps {
        // Nothing is ever sent: this returns when the sender (the earlier
        // request's ticket) is dropped.
        let _ = d.changed().await;
    }
}

/// The socket's read half and the bytes read ahead of the decoder.
struct Input {
    reader: BoxReader,
    buf: BytesMut,
}

enum Next {
    Header(RequestHeader),
    Eof,
    Shutdown,
}

impl Input {
    async fn header(
        &mut self,
        codec: &mut RequestCodec,
        shutdown: &CancellationToken,
    ) -> Result<Next, SessionError> {
        loop {
            if let Some(h) = codec.decode(&mut self.buf)? {
                return Ok(Next::Header(h));
            }
            if self.buf.capacity() - self.buf.len() < 16 * 1024 {
                self.buf.reserve(READ_AHEAD);
            }
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(Next::Shutdown),
                n = self.reader.read_buf(&mut self.buf) => match n? {
                    0 => return Ok(Next::Eof),
                    _ => continue,
                },
            }
        }
    }

    /// The next `n` payload bytes (at most a streaming window).
    async fn take(&mut self, n: usize) -> std::io::Result<Bytes> {
        while self.buf.len() < n {
            self.buf.reserve(n - self.buf.len());
            if self.reader.read_buf(&mut self.buf).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(self.buf.split_to(n).freeze())
    }

    /// Read and drop `n` payload bytes, never holding more than the
    /// read-ahead buffer.
    async fn skip(&mut self, mut n: u64) -> std::io::Result<()> {
        while n > 0 {
            if self.buf.is_empty() {
                self.buf.reserve(READ_AHEAD);
                if self.reader.read_buf(&mut self.buf).await? == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
            }
            let k = n.min(self.buf.len() as u64);
            self.buf.advance(k as usize);
            n -= k;
        }
        Ok(())
    }
}

/// Serve requests until DISC, EOF, an unrecoverable framing error, or
/// server shutdown. In-flight requests always finish and get their replies
/// before this returns.
pub async fn serve(
    io: Transport,
    buffered: BytesMut,
    negotiated: Negotiated,
    memory: Arc<ConnMemory>,
    shutdown: CancellationToken,
) -> Result<End, SessionError> {
    let ctx = Arc::new(Ctx {
        export: negotiated.export,
        structured: negotiated.structured || negotiated.extended,
        extended: negotiated.extended,
        contexts: negotiated.contexts,
    });
    let (reader, writer) = io.split();
    let mut codec = RequestCodec::new(ctx.extended);
    let (tx, rx) = mpsc::unbounded_channel();
    let writer_failed = CancellationToken::new();
    let writer = tokio::spawn(write_replies(writer, rx, codec, writer_failed.clone()));
    let mut input = Input {
        reader,
        buf: buffered,
    };
    // Payloads too long to serve are read and dropped up to this length
    // (the spec: up to 32 MiB SHOULD NOT be taken for denial of service);
    // longer ones end the session.
    let skip_limit = u64::from(ctx.export.block.maximum).max(32 << 20) * 2;
    let order = Arc::new(InOrder::default());

    let result: Result<End, SessionError> = loop {
        let h = match input.header(&mut codec, &shutdown).await {
            Ok(Next::Header(h)) => h,
            Ok(Next::Eof) => break Ok(End::Eof),
            Ok(Next::Shutdown) => break Ok(End::Shutdown),
            Err(e) => break Err(e),
        };
        if h.command == Command::Disc {
            break Ok(End::Disconnect);
        }
        if h.payload > skip_limit {
            let f = Failure::new(
                NbdError::Inval,
                format!(
                    "payload of {} bytes is beyond the {skip_limit}-byte limit; closing the connection",
                    h.payload
                ),
            );
            send_failure(&ctx, &tx, &h, f, Hold::default());
            break Ok(End::AbsurdWrite);
        }
        let credit = tokio::select! {
            c = memory.acquire(charge(&h)) => c,
            _ = writer_failed.cancelled() => break Ok(End::Eof), // the client is gone
            _ = shutdown.cancelled() => {
                let f = Failure::new(NbdError::Shutdown, "the server is shutting down");
                if let Err(e) = input.skip(h.payload).await {
                    break Err(e.into());
                }
                send_failure(&ctx, &tx, &h, f, Hold::default());
                break Ok(End::Shutdown);
            }
        };
        match prepare(&ctx, &h) {
            Ok(()) => {}
            Err(f) => {
                if let Err(e) = input.skip(h.payload).await {
                    break Err(e.into());
                }
                send_failure(&ctx, &tx, &h, f, Hold::credit(credit));
                continue;
            }
        }
        let (ticket, deps) = match range_of(&h) {
            Some((start, len, write)) => {
                let (t, d) = order.register(start, len, write);
                (Some(t), d)
            }
            None => (None, Vec::new()),
        };
        let (ctx2, tx2) = (ctx.clone(), tx.clone());
        if h.payload > STREAM_WINDOW {
            // Written as it arrives: the task writes one piece while the
            // reader reads the next.
            let (ptx, prx) = mpsc::unbounded_channel();
            tokio::spawn(async move {
                after(deps).await;
                handle(&ctx2, &tx2, h, Payload::Stream(prx), credit).await;
                drop(ticket);
            });
            let window = Arc::new(Semaphore::new((STREAM_WINDOW / PIECE) as usize));
            let mut done = 0u64;
            let mut failed = None;
            while done < h.payload {
                let slot = window
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("the window semaphore is never closed");
                let n = (h.payload - done).min(PIECE) as usize;
                match input.take(n).await {
                    Ok(piece) => {
                        // The task is gone only if the writer is: stop then.
                        let _ = ptx.send((piece, slot));
                    }
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
                done += n as u64;
            }
            drop(ptx);
            if let Some(e) = failed {
                break Err(e.into());
            }
            continue;
        }
        let payload = if h.payload > 0 {
            match input.take(h.payload as usize).await {
                Ok(p) => Payload::Whole(p),
                Err(e) => break Err(e.into()),
            }
        } else {
            Payload::None
        };
        tokio::spawn(async move {
            after(deps).await;
            handle(&ctx2, &tx2, h, payload, credit).await;
            drop(ticket);
        });
    };
    drop(tx);
    let written = writer
        .await
        .map_err(|e| SessionError::WriterTask(e.to_string()))?;
    match (result, written) {
        (Err(e), _) => Err(e),
        (Ok(end), Ok(())) => Ok(end),
        // A client that sent DISC or hung up may close before its last
        // replies; that is not a server error.
        (Ok(End::Disconnect | End::Eof | End::AbsurdWrite), Err(_)) => Ok(End::Eof),
        (Ok(End::Shutdown), Err(e)) => Err(e.into()),
    }
}

/// A WRITE's data: whole, or pieces as the reader gets them.
enum Payload {
    None,
    Whole(Bytes),
    Stream(mpsc::UnboundedReceiver<(Bytes, tokio::sync::OwnedSemaphorePermit)>),
}

fn send(tx: &Tx, reply: Reply, hold: Hold) {
    // A send fails only when the writer is gone; the reader notices that.
    let _ = tx.send(Outgoing::Reply { reply, hold });
}

fn send_failure(ctx: &Ctx, tx: &Tx, h: &RequestHeader, f: Failure, hold: Hold) {
    tracing::debug!(command = ?h.command, offset = h.offset, length = h.length, error = ?f.error, message = %f.message, "request failed");
    let reply = if ctx.structured {
        Reply::Chunk {
            handle: h.handle,
            offset: h.offset,
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
    send(tx, reply, hold);
}

fn send_ok(ctx: &Ctx, tx: &Tx, h: &RequestHeader, hold: Hold) {
    let reply = if ctx.extended || (ctx.structured && h.command == Command::Read) {
        Reply::Chunk {
            handle: h.handle,
            offset: h.offset,
            flags: reply_flags::DONE,
            payload: ChunkPayload::None,
        }
    } else {
        // Simple replies are allowed for payload-less success with
        // structured replies (not with extended headers), and are the
        // shortest.
        Reply::Simple {
            handle: h.handle,
            error: 0,
            data: None,
        }
    };
    send(tx, reply, hold);
}

fn chunk(h: &RequestHeader, flags: u16, payload: ChunkPayload) -> Reply {
    Reply::Chunk {
        handle: h.handle,
        offset: h.offset,
        flags,
        payload,
    }
}

/// Check a request before anything of it runs: flags, read-only, range.
fn prepare(ctx: &Ctx, h: &RequestHeader) -> Result<(), Failure> {
    let e = &ctx.export;
    let extra = h.flags & !h.command.allowed_flags(ctx.extended);
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
    let (offset, length) = (h.offset, h.length);
    match h.command {
        Command::Read | Command::Write | Command::Cache => e
            .check_block_sizes(offset, length, true)
            .map_err(Failure::range)?,
        Command::Trim | Command::WriteZeroes => e
            .check_block_sizes(offset, length, false)
            .map_err(Failure::range)?,
        Command::BlockStatus => {
            if !ctx.structured || ctx.contexts.is_empty() {
                return Err(Failure::new(
                    NbdError::Inval,
                    "NBD_CMD_BLOCK_STATUS without a negotiated metadata context",
                ));
            }
            if length == 0 {
                return Err(Failure::new(NbdError::Inval, "block status of length 0"));
            }
            e.check_block_sizes(offset, length, false)
                .map_err(Failure::range)?
        }
        Command::Flush | Command::Disc => {} // DISC: handled by the reader
        Command::Unknown(c) => {
            return Err(Failure::new(
                NbdError::Inval,
                format!("unknown command {c}"),
            ))
        }
    }
    // A streamed WRITE is written piece by piece as it arrives; one that
    // would run past the end is refused before any of it is written (the
    // region view checks each piece again, as it checks every call).
    if h.command == Command::Write && h.payload > STREAM_WINDOW {
        lungate_block::device::check_range(offset, length, e.size())
            .map_err(|r| Failure::range_of(&r, true))?;
    }
    if h.command == Command::Read && h.flags & cmd_flags::DF != 0 && length > STREAM_WINDOW {
        return Err(Failure::new(
            NbdError::Overflow,
            format!(
                "a read of {length} bytes cannot be sent unfragmented (NBD_CMD_FLAG_DF) \
                 beyond {STREAM_WINDOW} bytes"
            ),
        ));
    }
    if h.payload > 0 && h.command != Command::Write {
        return Err(Failure::new(
            NbdError::Inval,
            format!("{:?} takes no payload", h.command),
        ));
    }
    Ok(())
}

async fn handle(ctx: &Ctx, tx: &Tx, h: RequestHeader, payload: Payload, credit: Credit) {
    let st = &ctx.export.stats;
    ExportStats::add(&st.in_flight, 1);
    let mut credit = Some(credit);
    let r = run(ctx, tx, &h, payload, &mut credit).await;
    ExportStats::sub(&st.in_flight, 1);
    match (&r, h.command) {
        (Err(_), _) => ExportStats::add(&st.errors, 1),
        (Ok(_), Command::Read) => {
            ExportStats::add(&st.reads, 1);
            ExportStats::add(&st.bytes_read, h.length);
        }
        (Ok(_), Command::Write | Command::WriteZeroes | Command::Trim) => {
            ExportStats::add(&st.writes, 1);
            if h.command == Command::Write {
                ExportStats::add(&st.bytes_written, h.length);
            }
        }
        _ => {}
    }
    let hold = Hold {
        credit: credit.take(),
        piece: None,
    };
    match r {
        Ok(true) => {}
        Ok(false) => send_ok(ctx, tx, &h, hold),
        Err(f) => send_failure(ctx, tx, &h, f, hold),
    }
}

/// Execute one checked request. `Ok(true)`: replies already sent (they
/// took `credit`); `Ok(false)`: success without payload, caller replies.
async fn run(
    ctx: &Ctx,
    tx: &Tx,
    h: &RequestHeader,
    payload: Payload,
    credit: &mut Option<Credit>,
) -> Result<bool, Failure> {
    let dev = &ctx.export.dev;
    let fua = h.flags & cmd_flags::FUA != 0;
    let (offset, length) = (h.offset, h.length);
    match h.command {
        Command::Read => read(ctx, tx, h, credit).await.map(|()| true),
        Command::Write => {
            match payload {
                Payload::None => dev
                    .write(offset, Bytes::new(), fua)
                    .await
                    .map_err(|err| Failure::io("write", &err, true))?,
                Payload::Whole(data) => dev
                    .write(offset, data, fua)
                    .await
                    .map_err(|err| Failure::io("write", &err, true))?,
                Payload::Stream(pieces) => write_streamed(ctx, h, pieces).await?,
            }
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
            block_status(ctx, tx, h, credit).await?;
            Ok(true)
        }
        Command::Disc | Command::Unknown(_) => Ok(false), // refused by prepare
    }
}

/// NBD_CMD_BLOCK_STATUS: one chunk per selected context, each with its
/// context id, all looked up before the first goes out (a failure is one
/// error reply). The answer may cover less than asked (clients ask again
/// from where it stopped), never more than [`BLOCK_STATUS_SPAN`] (or the
/// extended span) and never more than [`MAX_DESCRIPTORS`] runs.
async fn block_status(
    ctx: &Ctx,
    tx: &Tx,
    h: &RequestHeader,
    credit: &mut Option<Credit>,
) -> Result<(), Failure> {
    let dev = &ctx.export.dev;
    let (offset, length) = (h.offset, h.length);
    // The whole request is range-checked; the answer may cover less.
    lungate_block::device::check_range(offset, length, ctx.export.size())
        .map_err(|r| Failure::range_of(&r, false))?;
    let span = length.min(if ctx.extended {
        BLOCK_STATUS_SPAN_EXTENDED
    } else {
        BLOCK_STATUS_SPAN
    });
    let take = if h.flags & cmd_flags::REQ_ONE != 0 {
        1
    } else {
        MAX_DESCRIPTORS
    };
    let mut payloads = Vec::with_capacity(ctx.contexts.len());
    for sel in &ctx.contexts {
        let runs: Vec<(u64, u32)> = match &sel.context {
            MetaContext::BaseAllocation => dev
                .extents(offset, span)
                .await
                .map_err(|err| Failure::io("block status", &err, false))?
                .into_iter()
                .map(|x| {
                    let flags = if x.data { 0 } else { state::HOLE | state::ZERO };
                    (x.length, flags)
                })
                .collect(),
            MetaContext::DirtyBitmap(snap) => {
                let changed = dev
                    .changed_since(snap, offset, span)
                    .await
                    .map_err(|err| dirty_failure(snap, &err))?;
                dirty_runs(offset, span, &changed)
            }
        };
        payloads.push(status_payload(ctx.extended, sel.id, runs, take));
    }
    let n = payloads.len();
    for (i, payload) in payloads.into_iter().enumerate() {
        let last = i + 1 == n;
        let hold = Hold {
            credit: if last { credit.take() } else { None },
            piece: None,
        };
        let flags = if last { reply_flags::DONE } else { 0 };
        send(tx, chunk(h, flags, payload), hold);
    }
    Ok(())
}

/// A dirty-bitmap lookup that failed: a snapshot deleted since the
/// handshake selected it is the client's to know about (EINVAL, named);
/// anything else is the stack's error.
fn dirty_failure(snap: &str, err: &std::io::Error) -> Failure {
    match err.kind() {
        std::io::ErrorKind::NotFound => Failure::new(
            NbdError::Inval,
            format!("qemu:dirty-bitmap:{snap}: snapshot {snap:?} no longer exists"),
        ),
        _ => Failure::io(&format!("qemu:dirty-bitmap:{snap}"), err, false),
    }
}

/// `[offset, offset + span)` as alternating clean (0) and dirty
/// ([`STATE_DIRTY`]) runs, from the changed ranges inside it (ascending,
/// disjoint).
fn dirty_runs(offset: u64, span: u64, changed: &[std::ops::Range<u64>]) -> Vec<(u64, u32)> {
    let end = offset + span;
    let mut runs: Vec<(u64, u32)> = Vec::with_capacity(changed.len() * 2 + 1);
    let mut push = |len: u64, flags: u32| match runs.last_mut() {
        Some((l, f)) if *f == flags => *l += len,
        _ if len > 0 => runs.push((len, flags)),
        _ => {}
    };
    let mut at = offset;
    for r in changed {
        let (s, e) = (r.start.max(at), r.end.min(end));
        if s >= e {
            continue;
        }
        push(s - at, 0);
        push(e - s, STATE_DIRTY);
        at = e;
    }
    push(end - at, 0);
    runs
}

/// One context's block-status chunk from its runs (lengths, flags), at
/// most `take` of them. Compact descriptors carry 32-bit lengths: a run
/// longer than that is cut and ends the list (the reply then covers less,
/// which the spec allows).
fn status_payload(
    extended: bool,
    context: u32,
    runs: Vec<(u64, u32)>,
    take: usize,
) -> ChunkPayload {
    if extended {
        return ChunkPayload::BlockStatusExt {
            context,
            extents: runs
                .into_iter()
                .take(take)
                .map(|(l, f)| (l, u64::from(f)))
                .collect(),
        };
    }
    let mut extents = Vec::with_capacity(runs.len().min(take));
    for (l, f) in runs.into_iter().take(take) {
        if l > u64::from(u32::MAX) {
            extents.push((MAX_COMPACT_RUN, f));
            break;
        }
        extents.push((l as u32, f));
    }
    ChunkPayload::BlockStatus { context, extents }
}

/// Write a streamed payload piece by piece as the reader delivers it. After
/// a failed piece the rest is still drained (the reader must get through
/// the payload) but not written.
async fn write_streamed(
    ctx: &Ctx,
    h: &RequestHeader,
    mut pieces: mpsc::UnboundedReceiver<(Bytes, tokio::sync::OwnedSemaphorePermit)>,
) -> Result<(), Failure> {
    let dev = &ctx.export.dev;
    let mut done = 0u64;
    let mut failed = None;
    while let Some((data, slot)) = pieces.recv().await {
        let n = data.len() as u64;
        if failed.is_none() {
            if let Err(e) = dev.write(h.offset + done, data, false).await {
                failed = Some(Failure::io("write", &e, true));
            }
        }
        drop(slot);
        done += n;
    }
    if let Some(f) = failed {
        return Err(f);
    }
    if done != h.payload {
        return Err(Failure::new(
            NbdError::Io,
            format!(
                "connection closed after {done} of {} payload bytes",
                h.payload
            ),
        ));
    }
    if h.flags & cmd_flags::FUA != 0 {
        dev.flush()
            .await
            .map_err(|err| Failure::io("flush after write", &err, false))?;
    }
    Ok(())
}

/// A structured read's answer from the stack as chunk payloads: holes of at
/// least [`MIN_HOLE_CHUNK`] as OFFSET_HOLE, shorter ones sent as zeros with
/// the data around them.
fn chunk_payloads(chunks: Vec<Chunk>) -> Vec<ChunkPayload> {
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
            // Data with nothing pending goes out as it came: no copy.
            Chunk::Data { offset, data: d } if data.is_none() => {
                out.push(ChunkPayload::OffsetData { offset, data: d });
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
    out
}

/// Zeros for holes too short to send as holes.
static ZERO_CHUNK: [u8; MIN_HOLE_CHUNK as usize] = [0; MIN_HOLE_CHUNK as usize];

async fn read(
    ctx: &Ctx,
    tx: &Tx,
    h: &RequestHeader,
    credit: &mut Option<Credit>,
) -> Result<(), Failure> {
    let dev = &ctx.export.dev;
    let length = h.length;
    if length == 0 {
        // Still a range check: an empty read past the end is refused.
        dev.read(h.offset, 0)
            .await
            .map_err(|err| Failure::io("read", &err, false))?;
        let hold = Hold {
            credit: credit.take(),
            piece: None,
        };
        send_ok(ctx, tx, h, hold);
        return Ok(());
    }
    if !ctx.structured {
        if length > STREAM_WINDOW {
            return read_simple_streamed(ctx, tx, h, credit).await;
        }
        let data = dev
            .read(h.offset, length as usize)
            .await
            .map_err(|err| Failure::io("read", &err, false))?;
        let reply = Reply::Simple {
            handle: h.handle,
            error: 0,
            data: Some(data),
        };
        send(
            tx,
            reply,
            Hold {
                credit: credit.take(),
                piece: None,
            },
        );
        return Ok(());
    }
    let sparse = h.flags & cmd_flags::DF == 0 && length >= SPARSE_READ_MIN;
    if length > STREAM_WINDOW {
        // prepare refused DF beyond the window.
        read_structured_streamed(ctx, tx, h, sparse, credit).await;
        return Ok(());
    }
    // Within the window: everything is read before the first chunk goes
    // out, so an I/O error is one error reply instead of a half-sent read.
    let chunks = if sparse {
        // One call, one consistent view: the stack says where it holds
        // zeros, and those go out as OFFSET_HOLE chunks.
        let c = dev
            .read_chunks(h.offset, length as usize)
            .await
            .map_err(|err| Failure::io("read", &err, false))?;
        chunk_payloads(c)
    } else {
        let data = dev
            .read(h.offset, length as usize)
            .await
            .map_err(|err| Failure::io("read", &err, false))?;
        vec![ChunkPayload::OffsetData {
            offset: h.offset,
            data,
        }]
    };
    let n = chunks.len();
    for (i, payload) in chunks.into_iter().enumerate() {
        let last = i + 1 == n;
        let hold = if last {
            Hold {
                credit: credit.take(),
                piece: None,
            }
        } else {
            Hold::default()
        };
        send(
            tx,
            chunk(h, if last { reply_flags::DONE } else { 0 }, payload),
            hold,
        );
    }
    Ok(())
}

/// A structured READ longer than the window: each piece is read from the
/// stack (holes included, when `sparse`) and goes out as its chunks as soon
/// as it is read, and a final NONE chunk ends the reply. A piece that fails
/// to read ends it with an ERROR_OFFSET chunk at that piece (the pieces
/// before it are valid).
async fn read_structured_streamed(
    ctx: &Ctx,
    tx: &Tx,
    h: &RequestHeader,
    sparse: bool,
    credit: &mut Option<Credit>,
) {
    let dev = &ctx.export.dev;
    let window = Arc::new(Semaphore::new((STREAM_WINDOW / PIECE) as usize));
    let mut done = 0u64;
    while done < h.length {
        let slot = window
            .clone()
            .acquire_owned()
            .await
            .expect("the window semaphore is never closed");
        let n = (h.length - done).min(PIECE);
        let piece_off = h.offset + done;
        let got = if sparse {
            dev.read_chunks(piece_off, n as usize)
                .await
                .map(chunk_payloads)
        } else {
            dev.read(piece_off, n as usize).await.map(|data| {
                vec![ChunkPayload::OffsetData {
                    offset: piece_off,
                    data,
                }]
            })
        };
        match got {
            Ok(payloads) => {
                // The piece's slot stays with its last chunk until that is
                // on the wire.
                let mut slot = Some(slot);
                let k = payloads.len();
                for (i, payload) in payloads.into_iter().enumerate() {
                    let piece = if i + 1 == k { slot.take() } else { None };
                    let hold = Hold {
                        credit: None,
                        piece,
                    };
                    send(tx, chunk(h, 0, payload), hold);
                }
            }
            Err(e) => {
                let f = Failure::io("read", &e, false);
                tracing::debug!(offset = piece_off, error = %f.message, "read failed mid-reply");
                let payload = ChunkPayload::ErrorOffset {
                    error: f.error.code(),
                    message: f.message,
                    offset: piece_off,
                };
                let hold = Hold {
                    credit: credit.take(),
                    piece: None,
                };
                send(tx, chunk(h, reply_flags::DONE, payload), hold);
                return;
            }
        }
        done += n;
    }
    let hold = Hold {
        credit: credit.take(),
        piece: None,
    };
    send(tx, chunk(h, reply_flags::DONE, ChunkPayload::None), hold);
}

/// A simple-reply READ longer than the window: the first piece is read
/// before the header goes out (so the usual failure is a clean error
/// reply), the rest follows piece by piece. A later failure can only end
/// the connection (the spec's rule for simple replies).
async fn read_simple_streamed(
    ctx: &Ctx,
    tx: &Tx,
    h: &RequestHeader,
    credit: &mut Option<Credit>,
) -> Result<(), Failure> {
    let dev = &ctx.export.dev;
    let window = Arc::new(Semaphore::new((STREAM_WINDOW / PIECE) as usize));
    let slot = window
        .clone()
        .acquire_owned()
        .await
        .expect("the window semaphore is never closed");
    let first = dev
        .read(h.offset, PIECE as usize)
        .await
        .map_err(|err| Failure::io("read", &err, false))?;
    let Some(c) = credit.take() else {
        return Err(Failure::new(NbdError::Io, "read without its credit"));
    };
    let (ptx, prx) = mpsc::unbounded_channel();
    let _ = tx.send(Outgoing::Stream {
        head: Reply::Simple {
            handle: h.handle,
            error: 0,
            data: None,
        },
        total: h.length,
        first: (first, slot),
        rest: prx,
        credit: c,
    });
    let mut done = PIECE;
    while done < h.length {
        let slot = window
            .clone()
            .acquire_owned()
            .await
            .expect("the window semaphore is never closed");
        let n = (h.length - done).min(PIECE);
        match dev.read(h.offset + done, n as usize).await {
            Ok(d) => {
                if ptx.send(Ok((d, slot))).is_err() {
                    break; // the writer is gone
                }
            }
            Err(e) => {
                tracing::warn!(offset = h.offset + done, error = %e,
                    "read failed after its simple reply header was sent; closing the connection");
                let _ = ptx.send(Err(()));
                break;
            }
        }
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_runs_alternate_clean_and_dirty_and_cover_the_span_exactly() {
        assert_eq!(dirty_runs(0, 100, &[]), vec![(100, 0)]);
        assert_eq!(
            dirty_runs(10, 100, &[0..20, 40..50, 50..60, 100..200]),
            vec![
                (10, STATE_DIRTY),
                (20, 0),
                (20, STATE_DIRTY),
                (40, 0),
                (10, STATE_DIRTY)
            ]
        );
        assert_eq!(
            dirty_runs(0, 64, &[0..32, 32..64]),
            vec![(64, STATE_DIRTY)],
            "adjacent changes are one run"
        );
    }

    #[test]
    fn compact_status_cuts_a_run_beyond_32_bits_and_req_one_keeps_one() {
        let runs = vec![(1u64 << 32, 0), (4096, STATE_DIRTY)];
        match status_payload(false, 3, runs.clone(), usize::MAX) {
            ChunkPayload::BlockStatus { context, extents } => {
                assert_eq!(context, 3);
                assert_eq!(extents, vec![(MAX_COMPACT_RUN, 0)]);
                assert_eq!(MAX_COMPACT_RUN % 512, 0);
            }
            other => panic!("{other:?}"),
        }
        match status_payload(true, 2, runs.clone(), usize::MAX) {
            ChunkPayload::BlockStatusExt { extents, .. } => {
                assert_eq!(extents, vec![(1 << 32, 0), (4096, 1)]);
            }
            other => panic!("{other:?}"),
        }
        match status_payload(true, 2, runs, 1) {
            ChunkPayload::BlockStatusExt { extents, .. } => assert_eq!(extents, vec![(1 << 32, 0)]),
            other => panic!("{other:?}"),
        }
    }
}
