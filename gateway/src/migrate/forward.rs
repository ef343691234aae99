//! Forwarding after a migration: the block device a source puts under a
//! migrated LUN's gate, so the NBD connections it still has keep working
//! (NBD has no redirect) until their clients disconnect.
//!
//! [`RemoteLun`] covers the LUN's byte range like the volume it replaces
//! and sends each request to the target gateway's export of the disk it
//! falls in, at the disk offset the source's region view mapped it from (a
//! request reaches the gate from one disk's region view, so it always lies
//! inside one piece of one disk: the disk's window, or in the aligned
//! layout either disk0's shadow area or the rest of disk0), over one pipelined NBD connection per
//! disk ([`NbdConn`]: fixed newstyle, `NBD_OPT_GO`, simple replies,
//! STARTTLS when the target's NBD listener speaks TLS). Requests go out in
//! the order they are called, so the holding queue's order carries over.
//!
//! Block status for a `qemu:dirty-bitmap:SNAP` context the client selected
//! before the migration goes to the same export over a second connection
//! per disk and snapshot, opened on first use with structured replies and
//! that one context (the snapshot tree moved with the LUN). The answer is
//! read after every write the client saw acknowledged, since the source
//! acknowledges a forwarded write only once the target has.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use lungate_api::nbd::proto::{
    chunk, client_flags, cmd_flags, handshake_flags, info, opt, rep, reply_flags, tx_flags,
    Command, IHAVEOPT, NBDMAGIC, OPTION_REPLY_MAGIC, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
};
use lungate_block::device::{done, BlockDevice, Caps, Extent, IoFuture};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

/// Largest READ or WRITE sent as one request, and the largest TRIM or
/// WRITE_ZEROES (lungate's default maximum block size is 64 MiB).
const MAX_IO: u64 = 32 << 20;
const MAX_EFFECT: u64 = 1 << 30;
/// Largest option reply accepted during the handshake.
const MAX_OPTION_REPLY: u32 = 64 << 10;
/// Largest structured reply chunk accepted (block status only).
const MAX_CHUNK: u32 = 1 << 20;
/// qemu's dirty-bitmap context flag: changed since the snapshot.
const STATE_DIRTY: u32 = 1;

/// TLS of a forwarding connection: the client settings and the name the
/// target's certificate must carry.
pub type Tls = Option<(
    Arc<rustls::ClientConfig>,
    rustls::pki_types::ServerName<'static>,
)>;

/// Where a connection goes, to open another like it.
#[derive(Clone)]
struct Dial {
    addr: std::net::SocketAddr,
    export: String,
    tls: Tls,
}

fn proto(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.into())
}

trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

struct Req {
    cmd: Command,
    flags: u16,
    offset: u64,
    len: u32,
    payload: Option<Bytes>,
    reply: oneshot::Sender<io::Result<Bytes>>,
}

type Pending = Arc<Mutex<HashMap<u64, (Command, u32, oneshot::Sender<io::Result<Bytes>>)>>>;

/// One NBD connection to one export, with requests pipelined.
pub struct NbdConn {
    tx: mpsc::UnboundedSender<Req>,
    size: u64,
    flags: u16,
    export: String,
    dial: Dial,
    /// The meta contexts selected, by name: their ids.
    contexts: HashMap<String, u32>,
}

async fn option_reply(s: &mut dyn Stream, want: u32) -> io::Result<(u32, Vec<u8>)> {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).await?;
    let magic = u64::from_be_bytes(h[0..8].try_into().expect("8"));
    let option = u32::from_be_bytes(h[8..12].try_into().expect("4"));
    let kind = u32::from_be_bytes(h[12..16].try_into().expect("4"));
    let len = u32::from_be_bytes(h[16..20].try_into().expect("4"));
    if magic != OPTION_REPLY_MAGIC || option != want {
        return Err(proto(format!(
            "bad option reply (magic {magic:#x}, option {option})"
        )));
    }
    if len > MAX_OPTION_REPLY {
        return Err(proto(format!("option reply of {len} bytes")));
    }
    let mut p = vec![0u8; len as usize];
    s.read_exact(&mut p).await?;
    Ok((kind, p))
}

async fn send_option(s: &mut dyn Stream, option: u32, data: &[u8]) -> io::Result<()> {
    let mut o = Vec::with_capacity(16 + data.len());
    o.extend_from_slice(&IHAVEOPT.to_be_bytes());
    o.extend_from_slice(&option.to_be_bytes());
    o.extend_from_slice(&(data.len() as u32).to_be_bytes());
    o.extend_from_slice(data);
    s.write_all(&o).await
}

/// Send `option` with no data; anything but its ACK is an error naming
/// `what`.
async fn acked_option(s: &mut dyn Stream, option: u32, what: &str) -> io::Result<()> {
    send_option(s, option, &[]).await?;
    let (kind, msg) = option_reply(s, option).await?;
    if kind != rep::ACK {
        return Err(proto(format!(
            "{what} refused ({kind:#x}): {}",
            String::from_utf8_lossy(&msg)
        )));
    }
    Ok(())
}

impl NbdConn {
    /// Connect to `addr`, upgrade with STARTTLS when `tls` is given
    /// (`server` is the name the certificate must carry), and select
    /// `export`.
    pub async fn connect(
        addr: std::net::SocketAddr,
        export: &str,
        tls: Tls,
    ) -> io::Result<NbdConn> {
        let dial = Dial {
            addr,
            export: export.to_string(),
            tls,
        };
        NbdConn::open(dial, None).await
    }

    /// Connect as `dial` says; with `context`, negotiate structured
    /// replies and select that meta context (it is missing from
    /// [`NbdConn::contexts`] when the server does not offer it).
    async fn open(dial: Dial, context: Option<&str>) -> io::Result<NbdConn> {
        let (addr, export, tls) = (dial.addr, dial.export.as_str(), dial.tls.clone());
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let mut s: Box<dyn Stream> = Box::new(tcp);
        let mut h = [0u8; 18];
        s.read_exact(&mut h).await?;
        if u64::from_be_bytes(h[0..8].try_into().expect("8")) != NBDMAGIC
            || u64::from_be_bytes(h[8..16].try_into().expect("8")) != IHAVEOPT
        {
            return Err(proto("no NBDMAGIC/IHAVEOPT greeting"));
        }
        let server = u16::from_be_bytes([h[16], h[17]]);
        if server & handshake_flags::FIXED_NEWSTYLE == 0 {
            return Err(proto("the server does not speak fixed newstyle"));
        }
        let mut cflags = client_flags::FIXED_NEWSTYLE;
        if server & handshake_flags::NO_ZEROES != 0 {
            cflags |= client_flags::NO_ZEROES;
        }
        s.write_all(&cflags.to_be_bytes()).await?;
        if let Some((cfg, name)) = tls {
            acked_option(&mut *s, opt::STARTTLS, "STARTTLS").await?;
            let t = tokio_rustls::TlsConnector::from(cfg)
                .connect(name, s)
                .await?;
            s = Box::new(t);
        }
        let name = export.as_bytes();
        let mut contexts = HashMap::new();
        if let Some(c) = context {
            acked_option(&mut *s, opt::STRUCTURED_REPLY, "structured replies").await?;
            let mut data = Vec::with_capacity(12 + name.len() + c.len());
            data.extend_from_slice(&(name.len() as u32).to_be_bytes());
            data.extend_from_slice(name);
            data.extend_from_slice(&1u32.to_be_bytes());
            data.extend_from_slice(&(c.len() as u32).to_be_bytes());
            data.extend_from_slice(c.as_bytes());
            send_option(&mut *s, opt::SET_META_CONTEXT, &data).await?;
            loop {
                let (kind, p) = option_reply(&mut *s, opt::SET_META_CONTEXT).await?;
                match kind {
                    rep::ACK => break,
                    rep::META_CONTEXT if p.len() >= 4 => {
                        let id = u32::from_be_bytes(p[0..4].try_into().expect("4"));
                        contexts.insert(String::from_utf8_lossy(&p[4..]).into_owned(), id);
                    }
                    k if k & (1 << 31) != 0 => {
                        return Err(proto(format!(
                            "meta context {c} refused ({k:#x}): {}",
                            String::from_utf8_lossy(&p)
                        )))
                    }
                    _ => {}
                }
            }
        }
        let mut data = Vec::with_capacity(6 + name.len());
        data.extend_from_slice(&(name.len() as u32).to_be_bytes());
        data.extend_from_slice(name);
        data.extend_from_slice(&0u16.to_be_bytes());
        send_option(&mut *s, opt::GO, &data).await?;
        let (mut size, mut flags, mut got) = (0u64, 0u16, false);
        loop {
            let (kind, p) = option_reply(&mut *s, opt::GO).await?;
            match kind {
                rep::ACK => break,
                rep::INFO if p.len() >= 2 && u16::from_be_bytes([p[0], p[1]]) == info::EXPORT => {
                    if p.len() != 12 {
                        return Err(proto("NBD_INFO_EXPORT is not 12 bytes"));
                    }
                    size = u64::from_be_bytes(p[2..10].try_into().expect("8"));
                    flags = u16::from_be_bytes([p[10], p[11]]);
                    got = true;
                }
                k if k & (1 << 31) != 0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!(
                            "export {export:?} refused ({k:#x}): {}",
                            String::from_utf8_lossy(&p)
                        ),
                    ))
                }
                _ => {}
            }
        }
        if !got {
            return Err(proto("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT"));
        }
        let (r, w) = tokio::io::split(s);
        let (tx, rx) = mpsc::unbounded_channel();
        let pending: Pending = Arc::default();
        tokio::spawn(writer(w, rx, pending.clone()));
        tokio::spawn(reader(r, pending));
        Ok(NbdConn {
            tx,
            size,
            flags,
            export: export.to_string(),
            dial,
            contexts,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    fn call(
        &self,
        cmd: Command,
        flags: u16,
        offset: u64,
        len: u32,
        payload: Option<Bytes>,
    ) -> IoFuture<Bytes> {
        let (reply, rx) = oneshot::channel();
        let sent = self.tx.send(Req {
            cmd,
            flags,
            offset,
            len,
            payload,
            reply,
        });
        let export = self.export.clone();
        Box::pin(async move {
            if sent.is_err() {
                return Err(gone(&export));
            }
            rx.await.map_err(|_| gone(&export))?
        })
    }
}

fn gone(export: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        format!("the connection to the new owner's export {export} is gone"),
    )
}

async fn writer(
    mut w: tokio::io::WriteHalf<Box<dyn Stream>>,
    mut rx: mpsc::UnboundedReceiver<Req>,
    pending: Pending,
) {
    let mut handle = 1u64;
    let mut buf = BytesMut::new();
    while let Some(first) = rx.recv().await {
        // Everything queued now goes out in one write.
        let mut next = Some(first);
        while let Some(r) = next.take() {
            let h = handle;
            handle += 1;
            buf.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
            buf.extend_from_slice(&r.flags.to_be_bytes());
            buf.extend_from_slice(&r.cmd.to_wire().to_be_bytes());
            buf.extend_from_slice(&h.to_be_bytes());
            buf.extend_from_slice(&r.offset.to_be_bytes());
            buf.extend_from_slice(&r.len.to_be_bytes());
            if let Some(p) = &r.payload {
                buf.extend_from_slice(p);
            }
            pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(h, (r.cmd, r.len, r.reply));
            if buf.len() < 4 << 20 {
                next = rx.try_recv().ok();
            }
        }
        if w.write_all(&buf).await.is_err() {
            break;
        }
        buf.clear();
    }
    // Fail what is still waiting; later calls fail on the closed channel.
    let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
    for (_, (_, _, tx)) in p.drain() {
        let _ = tx.send(Err(io::Error::from(io::ErrorKind::BrokenPipe)));
    }
}

async fn reader(mut r: tokio::io::ReadHalf<Box<dyn Stream>>, pending: Pending) {
    // Block-status payloads gathered until their reply's last chunk.
    let mut chunks: HashMap<u64, io::Result<BytesMut>> = HashMap::new();
    let err = loop {
        let mut h = [0u8; 16];
        if let Err(e) = r.read_exact(&mut h).await {
            break e;
        }
        let magic = u32::from_be_bytes(h[0..4].try_into().expect("4"));
        let code = u32::from_be_bytes(h[4..8].try_into().expect("4"));
        let handle = u64::from_be_bytes(h[8..16].try_into().expect("8"));
        if magic == STRUCTURED_REPLY_MAGIC {
            if let Err(e) = structured(&mut r, &h, &pending, &mut chunks).await {
                break e;
            }
            continue;
        }
        if magic != SIMPLE_REPLY_MAGIC {
            break proto(format!("reply magic {magic:#x} is not a simple reply"));
        }
        let Some((cmd, len, tx)) = pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&handle)
        else {
            break proto(format!("reply for handle {handle}, which was not sent"));
        };
        if code != 0 {
            // NBD error values are Linux errno values.
            let _ = tx.send(Err(io::Error::from_raw_os_error(code as i32)));
            continue;
        }
        if cmd == Command::Read {
            let mut data = vec![0u8; len as usize];
            if let Err(e) = r.read_exact(&mut data).await {
                let _ = tx.send(Err(io::Error::new(e.kind(), e.to_string())));
                break e;
            }
            let _ = tx.send(Ok(Bytes::from(data)));
        } else {
            let _ = tx.send(Ok(Bytes::new()));
        }
    };
    tracing::debug!("forwarding connection ended: {err}");
    let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
    for (_, (_, _, tx)) in p.drain() {
        let _ = tx.send(Err(io::Error::new(err.kind(), err.to_string())));
    }
}

/// One structured reply chunk (only block status is sent with structured
/// replies): `h` holds its first 16 bytes. A block-status chunk's
/// descriptors (after the context id: one context is selected) are
/// gathered; an error chunk fails the request; the last chunk answers it.
async fn structured(
    r: &mut tokio::io::ReadHalf<Box<dyn Stream>>,
    h: &[u8; 16],
    pending: &Pending,
    chunks: &mut HashMap<u64, io::Result<BytesMut>>,
) -> io::Result<()> {
    let flags = u16::from_be_bytes([h[4], h[5]]);
    let kind = u16::from_be_bytes([h[6], h[7]]);
    let handle = u64::from_be_bytes(h[8..16].try_into().expect("8"));
    let mut l = [0u8; 4];
    r.read_exact(&mut l).await?;
    let len = u32::from_be_bytes(l);
    if len > MAX_CHUNK {
        return Err(proto(format!("structured reply chunk of {len} bytes")));
    }
    let mut p = vec![0u8; len as usize];
    r.read_exact(&mut p).await?;
    if !pending
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .contains_key(&handle)
    {
        return Err(proto(format!(
            "reply for handle {handle}, which was not sent"
        )));
    }
    let got = chunks.entry(handle).or_insert_with(|| Ok(BytesMut::new()));
    match kind {
        chunk::BLOCK_STATUS if p.len() >= 4 => {
            if let Ok(b) = got {
                b.extend_from_slice(&p[4..]);
            }
        }
        chunk::NONE => {}
        k if k & (1 << 15) != 0 && p.len() >= 4 => {
            let errno = u32::from_be_bytes(p[0..4].try_into().expect("4"));
            *got = Err(io::Error::from_raw_os_error(errno as i32));
        }
        k => return Err(proto(format!("unexpected structured reply chunk type {k}"))),
    }
    if flags & reply_flags::DONE != 0 {
        let out = chunks.remove(&handle).expect("inserted above");
        if let Some((_, _, tx)) = pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&handle)
        {
            let _ = tx.send(out.map(BytesMut::freeze));
        }
    }
    Ok(())
}

/// One disk of a migrated LUN as the source's region view maps it: the
/// pieces of the LUN that hold its bytes, `(LUN offset, length, disk
/// offset)` (one for a window; two for an aligned disk0, whose first MiB
/// lives in the state region's shadow area), and a connection to the new
/// owner's export of it.
pub struct RemoteDisk {
    pub pieces: Vec<(u64, u64, u64)>,
    pub length: u64,
    pub conn: NbdConn,
}

/// A migrated LUN's byte range, forwarded disk by disk to the new owner.
pub struct RemoteLun {
    size: u64,
    read_only: bool,
    /// `(LUN offset, length, disk offset, disk)` of every piece of every
    /// disk, by LUN offset.
    routes: Vec<(u64, u64, u64, usize)>,
    conns: Vec<NbdConn>,
    /// Block-status connections, by disk and meta context, opened on
    /// first use.
    status: StatusConns,
}

type StatusConns = Arc<tokio::sync::Mutex<HashMap<(usize, String), Arc<NbdConn>>>>;

impl RemoteLun {
    pub fn new(size: u64, disks: Vec<RemoteDisk>) -> io::Result<RemoteLun> {
        let mut routes = Vec::new();
        let mut conns = Vec::new();
        for (i, d) in disks.into_iter().enumerate() {
            if d.conn.size() != d.length {
                return Err(proto(format!(
                    "the new owner's export {} is {} bytes, the disk is {}",
                    d.conn.export,
                    d.conn.size(),
                    d.length
                )));
            }
            for &(at, len, disk) in &d.pieces {
                let fits = |a: u64, b: u64, lim: u64| a.checked_add(b).is_some_and(|e| e <= lim);
                if len == 0 || !fits(at, len, size) || !fits(disk, len, d.length) {
                    return Err(proto(format!(
                        "disk {} piece [{at}, +{len}) at disk offset {disk} does not fit",
                        d.conn.export
                    )));
                }
                routes.push((at, len, disk, i));
            }
            conns.push(d.conn);
        }
        routes.sort_by_key(|r| r.0);
        if routes.windows(2).any(|w| w[0].0 + w[0].1 > w[1].0) {
            return Err(proto("the disks' pieces overlap"));
        }
        let read_only = conns.iter().any(|c| c.flags & tx_flags::READ_ONLY != 0);
        Ok(RemoteLun {
            size,
            read_only,
            routes,
            conns,
            status: StatusConns::default(),
        })
    }

    /// The disk holding `[offset, offset + len)`, and the offset in it.
    fn route(&self, offset: u64, len: u64) -> io::Result<(&NbdConn, u64)> {
        self.route_index(offset, len)
            .map(|(c, rel)| (&self.conns[c], rel))
    }

    /// [`RemoteLun::route`], with the disk's index.
    fn route_index(&self, offset: u64, len: u64) -> io::Result<(usize, u64)> {
        let i = self.routes.partition_point(|r| r.0 <= offset);
        if i > 0 {
            let (start, rlen, disk, c) = self.routes[i - 1];
            let rel = offset - start;
            if rel.checked_add(len).is_some_and(|e| e <= rlen) {
                return Ok((c, disk + rel));
            }
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("offset {offset} + length {len} is not inside one disk of the migrated LUN"),
        ))
    }

    /// Split `[offset, offset + len)` into requests of at most `max`.
    fn split(
        &self,
        cmd: Command,
        flags: u16,
        offset: u64,
        len: u64,
        max: u64,
    ) -> io::Result<Vec<IoFuture<Bytes>>> {
        let (c, rel) = self.route(offset, len)?;
        let mut v = Vec::new();
        let mut at = 0;
        loop {
            let n = (len - at).min(max);
            v.push(c.call(cmd, flags, rel + at, n as u32, None));
            at += n;
            if at >= len {
                return Ok(v);
            }
        }
    }
}

async fn all(v: Vec<IoFuture<Bytes>>) -> io::Result<()> {
    for f in v {
        f.await?;
    }
    Ok(())
}

impl BlockDevice for RemoteLun {
    fn size(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> Caps {
        Caps {
            writable: !self.read_only,
            flush: true,
            trim: true,
            fast_zero: true,
            extents: true,
        }
    }

    fn read(&self, offset: u64, len: usize) -> IoFuture<Bytes> {
        match self.split(Command::Read, 0, offset, len as u64, MAX_IO) {
            Err(e) => done(Err(e)),
            Ok(mut v) if v.len() == 1 => v.pop().expect("one"),
            Ok(v) => Box::pin(async move {
                let mut out = BytesMut::with_capacity(len);
                for f in v {
                    out.extend_from_slice(&f.await?);
                }
                Ok(out.freeze())
            }),
        }
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> IoFuture<()> {
        let (c, rel) = match self.route(offset, data.len() as u64) {
            Ok(r) => r,
            Err(e) => return done(Err(e)),
        };
        let flags = if fua { cmd_flags::FUA } else { 0 };
        let mut v = Vec::new();
        let mut at = 0usize;
        while at < data.len() {
            let n = (data.len() - at).min(MAX_IO as usize);
            let piece = data.slice(at..at + n);
            v.push(c.call(
                Command::Write,
                flags,
                rel + at as u64,
                n as u32,
                Some(piece),
            ));
            at += n;
        }
        Box::pin(all(v))
    }

    fn flush(&self) -> IoFuture<()> {
        let v: Vec<IoFuture<Bytes>> = self
            .conns
            .iter()
            .map(|c| c.call(Command::Flush, 0, 0, 0, None))
            .collect();
        Box::pin(all(v))
    }

    fn trim(&self, offset: u64, len: u64) -> IoFuture<()> {
        match self.split(Command::Trim, 0, offset, len, MAX_EFFECT) {
            Ok(v) => Box::pin(all(v)),
            Err(e) => done(Err(e)),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> IoFuture<()> {
        let flags = if may_trim { 0 } else { cmd_flags::NO_HOLE };
        match self.split(Command::WriteZeroes, flags, offset, len, MAX_EFFECT) {
            Ok(v) => Box::pin(all(v)),
            Err(e) => done(Err(e)),
        }
    }

    fn extents(&self, offset: u64, len: u64) -> IoFuture<Vec<Extent>> {
        // Reported as data (the spec allows it: zeros may be data); the
        // new owner's exports answer block status exactly.
        done(Ok(vec![Extent {
            offset,
            length: len,
            data: true,
        }]))
    }

    fn cache(&self, offset: u64, len: u64) -> IoFuture<()> {
        match self.split(Command::Cache, 0, offset, len, MAX_IO) {
            Ok(v) => Box::pin(all(v)),
            Err(e) => done(Err(e)),
        }
    }

    fn changed_since(
        &self,
        snapshot: &str,
        offset: u64,
        len: u64,
    ) -> IoFuture<Vec<std::ops::Range<u64>>> {
        let (disk, rel) = match self.route_index(offset, len) {
            Ok(r) => r,
            Err(e) => return done(Err(e)),
        };
        let dial = self.conns[disk].dial.clone();
        let status = self.status.clone();
        let context = format!("qemu:dirty-bitmap:{snapshot}");
        Box::pin(async move {
            let conn = {
                let mut m = status.lock().await;
                match m.get(&(disk, context.clone())) {
                    Some(c) => c.clone(),
                    None => {
                        let c = Arc::new(NbdConn::open(dial, Some(&context)).await?);
                        m.insert((disk, context.clone()), c.clone());
                        c
                    }
                }
            };
            if !conn.contexts.contains_key(&context) {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("the new owner's export {} offers no {context}", conn.export),
                ));
            }
            let mut out: Vec<std::ops::Range<u64>> = Vec::new();
            let mut at = 0u64;
            while at < len {
                let n = (len - at).min(MAX_EFFECT);
                let p = conn
                    .call(Command::BlockStatus, 0, rel + at, n as u32, None)
                    .await?;
                let mut covered = 0u64;
                for d in p.chunks_exact(8) {
                    let dlen = u64::from(u32::from_be_bytes(d[0..4].try_into().expect("4")));
                    let flags = u32::from_be_bytes(d[4..8].try_into().expect("4"));
                    let take = dlen.min(n - covered);
                    if flags & STATE_DIRTY != 0 && take > 0 {
                        let start = offset + at + covered;
                        match out.last_mut() {
                            Some(last) if last.end == start => last.end = start + take,
                            _ => out.push(start..start + take),
                        }
                    }
                    covered += take;
                    if covered >= n {
                        break;
                    }
                }
                if covered == 0 {
                    return Err(proto(format!(
                        "the new owner's export {} answered block status with no extent",
                        conn.export
                    )));
                }
                at += covered;
            }
            Ok(out)
        })
    }
}
