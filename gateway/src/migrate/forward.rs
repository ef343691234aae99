//! Forwarding after a migration: the block device a source puts under a
//! migrated LUN's gate, so the NBD connections it still has keep working
//! (NBD has no redirect) until their clients disconnect.
//!
//! [`RemoteLun`] covers the LUN's byte range like the volume it replaces
//! and sends each request to the target gateway's export of the disk it
//! falls in (a request reaches the gate from one disk's region view, so it
//! always lies inside one disk), over one pipelined NBD connection per
//! disk ([`NbdConn`]: fixed newstyle, `NBD_OPT_GO`, simple replies,
//! STARTTLS when the target's NBD listener speaks TLS). Requests go out in
//! the order they are called, so the holding queue's order carries over.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use lungate_api::nbd::proto::{
    client_flags, cmd_flags, handshake_flags, info, opt, rep, tx_flags, Command, IHAVEOPT,
    NBDMAGIC, OPTION_REPLY_MAGIC, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC,
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

impl NbdConn {
    /// Connect to `addr`, upgrade with STARTTLS when `tls` is given
    /// (`server` is the name the certificate must carry), and select
    /// `export`.
    pub async fn connect(
        addr: std::net::SocketAddr,
        export: &str,
        tls: Option<(
            Arc<rustls::ClientConfig>,
            rustls::pki_types::ServerName<'static>,
        )>,
    ) -> io::Result<NbdConn> {
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
            send_option(&mut *s, opt::STARTTLS, &[]).await?;
            let (kind, msg) = option_reply(&mut *s, opt::STARTTLS).await?;
            if kind != rep::ACK {
                return Err(proto(format!(
                    "STARTTLS refused ({kind:#x}): {}",
                    String::from_utf8_lossy(&msg)
                )));
            }
            let t = tokio_rustls::TlsConnector::from(cfg)
                .connect(name, s)
                .await?;
            s = Box::new(t);
        }
        let name = export.as_bytes();
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
    let err = loop {
        let mut h = [0u8; 16];
        if let Err(e) = r.read_exact(&mut h).await {
            break e;
        }
        let magic = u32::from_be_bytes(h[0..4].try_into().expect("4"));
        let code = u32::from_be_bytes(h[4..8].try_into().expect("4"));
        let handle = u64::from_be_bytes(h[8..16].try_into().expect("8"));
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

/// A migrated LUN's byte range, forwarded disk by disk to the new owner.
pub struct RemoteLun {
    size: u64,
    read_only: bool,
    /// `(start, length, connection)` of each disk region, by start.
    disks: Vec<(u64, u64, NbdConn)>,
}

impl RemoteLun {
    /// `disks`: `(LUN offset, length, connection to that disk's export)`.
    pub fn new(size: u64, mut disks: Vec<(u64, u64, NbdConn)>) -> io::Result<RemoteLun> {
        disks.sort_by_key(|d| d.0);
        for (start, len, c) in &disks {
            if c.size() != *len {
                return Err(proto(format!(
                    "the new owner's export {} is {} bytes, the disk at {start} is {len}",
                    c.export,
                    c.size()
                )));
            }
        }
        let read_only = disks.iter().any(|d| d.2.flags & tx_flags::READ_ONLY != 0);
        Ok(RemoteLun {
            size,
            read_only,
            disks,
        })
    }

    /// The disk holding `[offset, offset + len)`, and the offset in it.
    fn route(&self, offset: u64, len: u64) -> io::Result<(&NbdConn, u64)> {
        let i = self.disks.partition_point(|d| d.0 <= offset);
        if i > 0 {
            let (start, dlen, c) = &self.disks[i - 1];
            let rel = offset - start;
            if rel.checked_add(len).is_some_and(|e| e <= *dlen) {
                return Ok((c, rel));
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
            .disks
            .iter()
            .map(|(_, _, c)| c.call(Command::Flush, 0, 0, 0, None))
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
}
