//! Transmission phase of one connection.
//!
//! One reader loop decodes request headers, checks each request once
//! ([`prepare`]: flags, read-only, and the range through
//! [`Export::locate_checked`], the only place an export offset becomes a
//! file offset), and spawns one task per request; tasks run concurrently
//! and finish in any order; one writer task ([`super::writer`]) puts their
//! replies on the wire.
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
//! Each request takes its place at the LUN's live-switch gate in the order
//! the reader decoded it (see [`crate::switch`]) and holds its pass while
//! it runs, except that a streamed request takes a pass for each piece's
//! I/O only, so a client slow to send a payload or to read a reply never
//! holds up a switch; requests of one connection whose ranges overlap, one
//! of them a write, run in arrival order ([`InOrder`]). All I/O goes through the few
//! `Ctx` methods at the bottom.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use lungate_block::engine::IoEngine;
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::codec::Decoder;
use tokio_util::sync::CancellationToken;

use super::codec::{ChunkPayload, CodecError, Reply, RequestCodec, RequestHeader};
use super::handshake::Negotiated;
use super::proto::{cmd_flags, reply_flags, state, Command, NbdError, BASE_ALLOCATION_ID};
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
    engine: IoEngine,
    /// Structured replies (or extended headers, which imply them).
    structured: bool,
    extended: bool,
    base_allocation: bool,
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

/// A request that passed [`prepare`]: `at` is its file offset.
#[derive(Debug, Clone, Copy)]
struct Job {
    at: u64,
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
    engine: IoEngine,
    memory: Arc<ConnMemory>,
    shutdown: CancellationToken,
) -> Result<End, SessionError> {
    let ctx = Arc::new(Ctx {
        export: negotiated.export,
        engine,
        structured: negotiated.structured || negotiated.extended,
        extended: negotiated.extended,
        base_allocation: negotiated.base_allocation,
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
        let job = match prepare(&ctx, &h) {
            Ok(j) => j,
            Err(f) => {
                if let Err(e) = input.skip(h.payload).await {
                    break Err(e.into());
                }
                send_failure(&ctx, &tx, &h, f, Hold::credit(credit));
                continue;
            }
        };
        // A request streamed in pieces takes the gate once per piece
        // instead (`Ctx::piece_pass`): holding it while waiting for a slow
        // client's payload or for it to read the reply would hold up every
        // live switch of the LUN.
        let streamed =
            h.payload > STREAM_WINDOW || (h.command == Command::Read && h.length > STREAM_WINDOW);
        let (ticket, deps) = match range_of(&h) {
            Some((start, len, write)) => {
                let (t, d) = order.register(start, len, write);
                (Some(t), d)
            }
            None => (None, Vec::new()),
        };
        // A request that must wait for earlier overlapping ones takes its
        // place at the gate only once they are done, for the same reason.
        let entry = match &ctx.export.lun {
            Some(l) if !streamed && deps.is_empty() => Gated::Entry(l.gate.enter()),
            Some(_) if !streamed => Gated::Late,
            _ => Gated::Pieces,
        };
        let (ctx2, tx2) = (ctx.clone(), tx.clone());
        if h.payload > STREAM_WINDOW {
            // Written as it arrives: the task writes one piece while the
            // reader reads the next.
            let (ptx, prx) = mpsc::unbounded_channel();
            tokio::spawn(async move {
                after(deps).await;
                handle(&ctx2, &tx2, h, job, Payload::Stream(prx), credit).await;
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
            let _pass = match entry {
                Gated::Entry(e) => Some(e.ready().await),
                Gated::Late => {
                    after(deps).await;
                    ctx2.piece_pass().await
                }
                Gated::Pieces => {
                    after(deps).await;
                    None
                }
            };
            handle(&ctx2, &tx2, h, job, payload, credit).await;
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

/// How a request holds its LUN's live-switch gate.
enum Gated {
    /// Its place, taken in arrival order when the reader decoded it.
    Entry(crate::switch::Entry),
    /// A place taken once the earlier requests it overlaps are done.
    Late,
    /// A place per piece of a streamed request (or no LUN behind the export).
    Pieces,
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
fn prepare(ctx: &Ctx, h: &RequestHeader) -> Result<Job, Failure> {
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
    let at = match h.command {
        Command::Read | Command::Cache => e
            .locate_checked(offset, length, true)
            .map_err(|r| Failure::range(r, false))?,
        Command::Write => e
            .locate_checked(offset, length, true)
            .map_err(|r| Failure::range(r, true))?,
        Command::Trim => e
            .locate_checked(offset, length, false)
            .map_err(|r| Failure::range(r, false))?,
        Command::WriteZeroes => e
            .locate_checked(offset, length, false)
            .map_err(|r| Failure::range(r, true))?,
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
            e.locate_checked(offset, length, false)
                .map_err(|r| Failure::range(r, false))?
        }
        Command::Flush => 0,
        Command::Disc => 0, // handled by the reader; never spawned
        Command::Unknown(c) => {
            return Err(Failure::new(
                NbdError::Inval,
                format!("unknown command {c}"),
            ))
        }
    };
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
    Ok(Job { at })
}

async fn handle(ctx: &Ctx, tx: &Tx, h: RequestHeader, job: Job, payload: Payload, credit: Credit) {
    let st = &ctx.export.stats;
    ExportStats::add(&st.in_flight, 1);
    let mut credit = Some(credit);
    let r = run(ctx, tx, &h, job, payload, &mut credit).await;
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
    job: Job,
    payload: Payload,
    credit: &mut Option<Credit>,
) -> Result<bool, Failure> {
    let fua = h.flags & cmd_flags::FUA != 0;
    let (at, length) = (job.at, h.length);
    match h.command {
        Command::Read => read(ctx, tx, h, at, credit).await.map(|()| true),
        Command::Write => {
            match payload {
                Payload::None => {}
                Payload::Whole(data) => ctx
                    .write_at(at, data, fua)
                    .await
                    .map_err(|err| Failure::io("write", &err))?,
                Payload::Stream(pieces) => write_streamed(ctx, h, at, pieces).await?,
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
            if length > 0 {
                ctx.cache(at, length);
            }
            Ok(false)
        }
        Command::BlockStatus => {
            let span = length.min(if ctx.extended {
                BLOCK_STATUS_SPAN_EXTENDED
            } else {
                BLOCK_STATUS_SPAN
            });
            let extents = allocation(ctx, at, h.offset, span).await?;
            let flags_of = |hole: bool| if hole { state::HOLE | state::ZERO } else { 0 };
            let one = h.flags & cmd_flags::REQ_ONE != 0;
            let take = if one { 1 } else { usize::MAX };
            let payload = if ctx.extended {
                ChunkPayload::BlockStatusExt {
                    context: BASE_ALLOCATION_ID,
                    extents: extents
                        .into_iter()
                        .take(take)
                        .map(|(len, hole)| (len, u64::from(flags_of(hole))))
                        .collect(),
                }
            } else {
                // span <= 2^32 and the runs cover it, so only a single run
                // of exactly 4 GiB would not fit; it is cut to fit.
                ChunkPayload::BlockStatus {
                    context: BASE_ALLOCATION_ID,
                    extents: extents
                        .into_iter()
                        .take(take)
                        .map(|(len, hole)| (len.min(u64::from(u32::MAX)) as u32, flags_of(hole)))
                        .collect(),
                }
            };
            send(
                tx,
                chunk(h, reply_flags::DONE, payload),
                Hold {
                    credit: credit.take(),
                    piece: None,
                },
            );
            Ok(true)
        }
        Command::Disc | Command::Unknown(_) => Ok(false), // refused by prepare
    }
}

/// Write a streamed payload piece by piece as the reader delivers it. After
/// a failed piece the rest is still drained (the reader must get through
/// the payload) but not written.
async fn write_streamed(
    ctx: &Ctx,
    h: &RequestHeader,
    at: u64,
    mut pieces: mpsc::UnboundedReceiver<(Bytes, tokio::sync::OwnedSemaphorePermit)>,
) -> Result<(), Failure> {
    let mut done = 0u64;
    let mut failed = None;
    while let Some((data, slot)) = pieces.recv().await {
        let n = data.len() as u64;
        if failed.is_none() {
            let _pass = ctx.piece_pass().await;
            if let Err(e) = ctx.write_at(at + done, data, false).await {
                failed = Some(Failure::io("write", &e));
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
        let _pass = ctx.piece_pass().await;
        ctx.flush()
            .await
            .map_err(|err| Failure::io("flush after write", &err))?;
    }
    Ok(())
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

/// Runs merged into (export offset, length, hole) segments, holes shorter
/// than [`MIN_HOLE_CHUNK`] folded into the data around them.
fn segments(offset: u64, runs: Vec<(u64, bool)>) -> Vec<(u64, u64, bool)> {
    let mut segs: Vec<(u64, u64, bool)> = Vec::new();
    let mut pos = offset;
    for (len, hole) in runs {
        let hole = hole && len >= MIN_HOLE_CHUNK;
        match segs.last_mut() {
            Some((_, l, hh)) if *hh == hole => *l += len,
            _ => segs.push((pos, len, hole)),
        }
        pos += len;
    }
    segs
}

async fn read(
    ctx: &Ctx,
    tx: &Tx,
    h: &RequestHeader,
    at: u64,
    credit: &mut Option<Credit>,
) -> Result<(), Failure> {
    let length = h.length;
    if length == 0 {
        let hold = Hold {
            credit: credit.take(),
            piece: None,
        };
        send_ok(ctx, tx, h, hold);
        return Ok(());
    }
    if !ctx.structured {
        if length > STREAM_WINDOW {
            return read_simple_streamed(ctx, tx, h, at, credit).await;
        }
        let data = ctx
            .read_at(at, length as usize)
            .await
            .map_err(|err| Failure::io("read", &err))?;
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
    let segs = if sparse {
        let _pass = if length > STREAM_WINDOW {
            ctx.piece_pass().await
        } else {
            None // the caller holds the request's pass
        };
        segments(h.offset, allocation(ctx, at, h.offset, length).await?)
    } else {
        vec![(h.offset, length, false)]
    };
    if length > STREAM_WINDOW {
        read_structured_streamed(ctx, tx, h, at, segs, credit).await;
        return Ok(());
    }
    // Within the window: everything is read before the first chunk goes
    // out, so an I/O error is one error reply instead of a half-sent read.
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

/// A structured READ longer than the window: each data piece goes out as
/// its own OFFSET_DATA chunk as soon as it is read, holes as OFFSET_HOLE,
/// and a final NONE chunk ends it. A piece that fails to read ends it with
/// an ERROR_OFFSET chunk at that piece (the pieces before it are valid).
async fn read_structured_streamed(
    ctx: &Ctx,
    tx: &Tx,
    h: &RequestHeader,
    at: u64,
    segs: Vec<(u64, u64, bool)>,
    credit: &mut Option<Credit>,
) {
    let window = Arc::new(Semaphore::new((STREAM_WINDOW / PIECE) as usize));
    for (off, len, hole) in segs {
        if hole {
            let payload = ChunkPayload::OffsetHole {
                offset: off,
                length: len as u32,
            };
            send(tx, chunk(h, 0, payload), Hold::default());
            continue;
        }
        let mut done = 0u64;
        while done < len {
            let slot = window
                .clone()
                .acquire_owned()
                .await
                .expect("the window semaphore is never closed");
            let n = (len - done).min(PIECE);
            let piece_off = off + done;
            let pass = ctx.piece_pass().await;
            let got = ctx.read_at(at + (piece_off - h.offset), n as usize).await;
            drop(pass);
            match got {
                Ok(data) => {
                    let payload = ChunkPayload::OffsetData {
                        offset: piece_off,
                        data,
                    };
                    let hold = Hold {
                        credit: None,
                        piece: Some(slot),
                    };
                    send(tx, chunk(h, 0, payload), hold);
                }
                Err(e) => {
                    let f = Failure::io("read", &e);
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
    at: u64,
    credit: &mut Option<Credit>,
) -> Result<(), Failure> {
    let window = Arc::new(Semaphore::new((STREAM_WINDOW / PIECE) as usize));
    let slot = window
        .clone()
        .acquire_owned()
        .await
        .expect("the window semaphore is never closed");
    let pass = ctx.piece_pass().await;
    let first = ctx
        .read_at(at, PIECE as usize)
        .await
        .map_err(|err| Failure::io("read", &err))?;
    drop(pass);
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
        let pass = ctx.piece_pass().await;
        let got = ctx.read_at(at + done, n as usize).await;
        drop(pass);
        match got {
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

// The data path: through the served LUN (fast path or volume), or straight
// to the engine for a bare file view. Offsets are file offsets that
// `prepare` produced.
impl Ctx {
    /// A pass at the LUN's gate for one piece of a streamed request.
    async fn piece_pass(&self) -> Option<crate::switch::Pass> {
        match &self.export.lun {
            Some(l) => Some(l.gate.enter().ready().await),
            None => None,
        }
    }
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
    /// NBD_CMD_CACHE: a read-ahead hint on the LUN file.
    fn cache(&self, at: u64, len: u64) {
        // SAFETY: posix_fadvise only reads its integer arguments; the fd is
        // owned by `self.export.file`, which outlives this call.
        let rc = unsafe {
            libc::posix_fadvise(
                self.export.file.as_raw_fd(),
                at as libc::off_t,
                len as libc::off_t,
                libc::POSIX_FADV_WILLNEED,
            )
        };
        if rc != 0 {
            tracing::debug!(rc, "posix_fadvise(WILLNEED) failed; cache hint ignored");
        }
    }
}
