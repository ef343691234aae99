//! A hostile NBD client, built by hand over `TcpStream` / `UnixStream`, that
//! speaks the fixed-newstyle handshake itself and then sends requests no
//! real client would: ranges at, across and far past the end of the export,
//! offsets that overflow u64, zero and absurd lengths, truncated frames, bad
//! magic, unknown commands, flags and options, lying option lengths,
//! nonexistent and path-like export names, writes to read-only exports and
//! BLOCK_STATUS without a meta context.
//!
//! What it proves: lungate answers each with the error the NBD spec
//! (NetworkBlockDevice/nbd doc/proto.md, "Error values" and the request
//! sections) prescribes or hangs up where the spec allows it, never touches
//! a byte of the LUN outside the disk region (hidden digest unchanged, last
//! block intact), never allocates what a client merely claims to send, and
//! stays alive and serving for the next client (qemu-io).
//!
//! `reference_nbdkit_agrees_with_these_expectations` runs the spec-level
//! checks against nbdkit's file plugin, so the expected codes are those a
//! mature server returns for the same bytes, not guesses.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lungate_tests::{
    disk_regions, file_bytes, hidden_digest, pattern_bytes, qemu_io_ok, require_tool, run_ok,
    wait_timeout, Gateway, Pool, TlsCerts,
};

/// Wire constants from the NBD protocol.
mod nbd {
    pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
    pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
    pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
    pub const REQUEST_MAGIC: u32 = 0x2560_9513;
    pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
    pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

    pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
    pub const FLAG_NO_ZEROES: u16 = 2;
    pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1;
    pub const FLAG_C_NO_ZEROES: u32 = 2;

    pub const OPT_EXPORT_NAME: u32 = 1;
    pub const OPT_ABORT: u32 = 2;
    pub const OPT_LIST: u32 = 3;
    pub const OPT_STARTTLS: u32 = 5;
    pub const OPT_INFO: u32 = 6;
    pub const OPT_GO: u32 = 7;
    pub const OPT_STRUCTURED_REPLY: u32 = 8;
    pub const OPT_SET_META_CONTEXT: u32 = 10;

    pub const REP_ACK: u32 = 1;
    pub const REP_SERVER: u32 = 2;
    pub const REP_INFO: u32 = 3;
    pub const REP_META_CONTEXT: u32 = 4;
    pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
    pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
    pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
    pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
    pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
    pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

    pub const INFO_EXPORT: u16 = 0;

    pub const TFLAG_READ_ONLY: u16 = 1 << 1;
    pub const TFLAG_SEND_DF: u16 = 1 << 7;

    pub const CMD_READ: u16 = 0;
    pub const CMD_WRITE: u16 = 1;
    pub const CMD_DISC: u16 = 2;
    pub const CMD_FLUSH: u16 = 3;
    pub const CMD_TRIM: u16 = 4;
    pub const CMD_CACHE: u16 = 5;
    pub const CMD_WRITE_ZEROES: u16 = 6;
    pub const CMD_BLOCK_STATUS: u16 = 7;

    pub const CMD_FLAG_FUA: u16 = 1;
    pub const CMD_FLAG_NO_HOLE: u16 = 2;
    pub const CMD_FLAG_DF: u16 = 4;
    pub const CMD_FLAG_REQ_ONE: u16 = 8;

    pub const REPLY_FLAG_DONE: u16 = 1;
    pub const REPLY_TYPE_NONE: u16 = 0;
    pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
    pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
    pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
    pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
    pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

    pub const EPERM: u32 = 1;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    pub const EOVERFLOW: u32 = 75;
}

/// How long the client waits for any single reply before calling the
/// server hung.
const REPLY_TIMEOUT: Duration = Duration::from_secs(20);
const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

#[derive(Clone, Debug)]
enum Addr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One option reply during haggling.
#[derive(Debug)]
struct OptReply {
    opt: u32,
    rtype: u32,
    data: Vec<u8>,
}

/// One structured reply chunk.
#[derive(Debug)]
struct Chunk {
    flags: u16,
    rtype: u16,
    handle: u64,
    payload: Vec<u8>,
}

/// The largest option reply or structured chunk payload this client
/// accepts from the server (a read reply chunk is at most one request).
const MAX_REPLY: u32 = 64 * 1024 * 1024 + 64;

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().expect("2 bytes"))
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

fn rep_name(r: u32) -> String {
    let n = match r {
        nbd::REP_ACK => "ACK",
        nbd::REP_SERVER => "SERVER",
        nbd::REP_INFO => "INFO",
        nbd::REP_META_CONTEXT => "META_CONTEXT",
        nbd::REP_ERR_UNSUP => "ERR_UNSUP",
        nbd::REP_ERR_POLICY => "ERR_POLICY",
        nbd::REP_ERR_INVALID => "ERR_INVALID",
        nbd::REP_ERR_TLS_REQD => "ERR_TLS_REQD",
        nbd::REP_ERR_UNKNOWN => "ERR_UNKNOWN",
        nbd::REP_ERR_TOO_BIG => "ERR_TOO_BIG",
        x if x & (1 << 31) != 0 => return format!("ERR_{}", x & !(1 << 31)),
        x => return format!("reply type {x}"),
    };
    n.to_string()
}

/// A raw NBD client: bytes in, bytes out, no opinions.
struct Raw {
    s: Conn,
    what: String,
    hs_flags: u16,
}

impl Raw {
    /// Connects and reads the server greeting (NBDMAGIC, IHAVEOPT, flags).
    fn connect(addr: &Addr) -> Raw {
        let s = match addr {
            Addr::Tcp(a) => {
                let s = TcpStream::connect(a).unwrap_or_else(|e| panic!("connect {a}: {e}"));
                s.set_read_timeout(Some(REPLY_TIMEOUT)).expect("timeout");
                s.set_write_timeout(Some(REPLY_TIMEOUT)).expect("timeout");
                s.set_nodelay(true).expect("nodelay");
                Conn::Tcp(s)
            }
            Addr::Unix(p) => {
                let s = UnixStream::connect(p)
                    .unwrap_or_else(|e| panic!("connect {}: {e}", p.display()));
                s.set_read_timeout(Some(REPLY_TIMEOUT)).expect("timeout");
                s.set_write_timeout(Some(REPLY_TIMEOUT)).expect("timeout");
                Conn::Unix(s)
            }
        };
        let mut r = Raw {
            s,
            what: format!("{addr:?}"),
            hs_flags: 0,
        };
        let g = r.read_n(18, "server greeting");
        assert_eq!(be64(&g[0..]), nbd::NBDMAGIC, "greeting magic");
        assert_eq!(be64(&g[8..]), nbd::IHAVEOPT, "newstyle magic");
        r.hs_flags = be16(&g[16..]);
        assert!(
            r.hs_flags & nbd::FLAG_FIXED_NEWSTYLE != 0,
            "server does not offer fixed newstyle (flags {:#x})",
            r.hs_flags
        );
        r
    }

    /// Connects and sends client flags FIXED_NEWSTYLE (+ NO_ZEROES when
    /// offered): ready for option haggling.
    fn start(addr: &Addr) -> Raw {
        let mut r = Raw::connect(addr);
        let mut cf = nbd::FLAG_C_FIXED_NEWSTYLE;
        if r.hs_flags & nbd::FLAG_NO_ZEROES != 0 {
            cf |= nbd::FLAG_C_NO_ZEROES;
        }
        r.send(&cf.to_be_bytes());
        r
    }

    fn send(&mut self, b: &[u8]) {
        self.s
            .write_all(b)
            .unwrap_or_else(|e| panic!("{}: send {} bytes: {e}", self.what, b.len()));
    }

    /// Sends without panicking: the server may legitimately have hung up.
    fn try_send(&mut self, b: &[u8]) -> io::Result<()> {
        self.s.write_all(b)
    }

    fn read_n(&mut self, n: usize, what: &str) -> Vec<u8> {
        self.try_read_n(n)
            .unwrap_or_else(|e| panic!("{}: reading {what} ({n} bytes): {e}", self.what))
    }

    fn try_read_n(&mut self, n: usize) -> io::Result<Vec<u8>> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b)?;
        Ok(b)
    }

    fn send_opt_header(&mut self, opt: u32, len: u32) {
        let mut b = Vec::with_capacity(16);
        b.extend_from_slice(&nbd::IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        self.send(&b);
    }

    fn send_opt(&mut self, opt: u32, data: &[u8]) {
        let mut b = Vec::with_capacity(16 + data.len());
        b.extend_from_slice(&nbd::IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&u32::try_from(data.len()).expect("option len").to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }

    fn try_opt_reply(&mut self) -> io::Result<OptReply> {
        let h = self.try_read_n(20)?;
        assert_eq!(be64(&h), nbd::OPT_REPLY_MAGIC, "option reply magic");
        let len = be32(&h[16..]);
        assert!(len <= MAX_REPLY, "option reply length {len} is absurd");
        let data = self.try_read_n(len as usize)?;
        Ok(OptReply {
            opt: be32(&h[8..]),
            rtype: be32(&h[12..]),
            data,
        })
    }

    fn opt_reply(&mut self) -> OptReply {
        self.try_opt_reply()
            .unwrap_or_else(|e| panic!("{}: reading option reply: {e}", self.what))
    }

    /// Reads replies to `opt` up to and including the final one (ACK or an
    /// error); returns them all.
    fn opt_replies(&mut self, opt: u32) -> Vec<OptReply> {
        let mut v = Vec::new();
        loop {
            let r = self.opt_reply();
            assert_eq!(r.opt, opt, "reply names option {} not {opt}: {r:?}", r.opt);
            let last = !matches!(
                r.rtype,
                nbd::REP_SERVER | nbd::REP_INFO | nbd::REP_META_CONTEXT
            );
            v.push(r);
            if last {
                return v;
            }
        }
    }

    /// The final reply type to an option with `data`.
    fn opt_final(&mut self, opt: u32, data: &[u8]) -> u32 {
        self.send_opt(opt, data);
        self.opt_replies(opt).last().expect("at least one").rtype
    }

    fn structured(&mut self) -> u32 {
        self.opt_final(nbd::OPT_STRUCTURED_REPLY, &[])
    }

    /// `NBD_OPT_SET_META_CONTEXT export [queries]`: the context ids given.
    fn set_meta(&mut self, export: &str, queries: &[&str]) -> (u32, Vec<(u32, String)>) {
        let mut d = Vec::new();
        d.extend_from_slice(&(export.len() as u32).to_be_bytes());
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        self.send_opt(nbd::OPT_SET_META_CONTEXT, &d);
        let rs = self.opt_replies(nbd::OPT_SET_META_CONTEXT);
        let ctx = rs
            .iter()
            .filter(|r| r.rtype == nbd::REP_META_CONTEXT)
            .map(|r| {
                (
                    be32(&r.data),
                    String::from_utf8_lossy(&r.data[4..]).into_owned(),
                )
            })
            .collect();
        (rs.last().expect("final").rtype, ctx)
    }

    /// `NBD_OPT_GO` / `NBD_OPT_INFO` data for `export` with no info requests.
    fn go_data(export: &[u8]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(export.len() as u32).to_be_bytes());
        d.extend_from_slice(export);
        d.extend_from_slice(&0u16.to_be_bytes());
        d
    }

    /// Sends `opt` (GO or INFO) for `export`; Ok((size, flags)) on ACK,
    /// Err(final reply type) otherwise.
    fn go_opt(&mut self, opt: u32, export: &[u8]) -> Result<(u64, u16), u32> {
        self.send_opt(opt, &Raw::go_data(export));
        let rs = self.opt_replies(opt);
        let last = rs.last().expect("final").rtype;
        if last != nbd::REP_ACK {
            return Err(last);
        }
        let info = rs
            .iter()
            .find(|r| r.rtype == nbd::REP_INFO && be16(&r.data) == nbd::INFO_EXPORT)
            .unwrap_or_else(|| panic!("GO/INFO ACKed without NBD_INFO_EXPORT: {rs:?}"));
        assert_eq!(info.data.len(), 12, "NBD_INFO_EXPORT length");
        Ok((be64(&info.data[2..]), be16(&info.data[10..])))
    }

    /// True if the server closes the connection (EOF or reset) within
    /// [`REPLY_TIMEOUT`]; false if it sends anything instead. Panics if it
    /// does neither: a hung connection is a failure.
    fn closes(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => true,
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut =>
            {
                panic!(
                    "{}: server neither replied nor hung up within {REPLY_TIMEOUT:?}",
                    self.what
                )
            }
            Err(e) => panic!("{}: read: {e}", self.what),
        }
    }
}

impl Raw {
    /// Reads until the server closes the connection, allowing it to say up
    /// to `max` bytes first (e.g. a TLS alert); panics if it keeps talking
    /// or neither talks nor closes within [`REPLY_TIMEOUT`].
    fn closes_after(&mut self, max: usize) -> Vec<u8> {
        let mut got = Vec::new();
        let mut b = [0u8; 512];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return got,
                Ok(n) => {
                    got.extend_from_slice(&b[..n]);
                    assert!(
                        got.len() <= max,
                        "{}: server kept talking: {got:02x?}",
                        self.what
                    );
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return got,
                Err(e) => panic!("{}: server did not hang up: {e}", self.what),
            }
        }
    }
}

/// A connection in the transmission phase.
struct Session {
    raw: Raw,
    size: u64,
    tflags: u16,
    structured: bool,
    next_handle: u64,
}

/// What a request got back.
#[derive(Debug, PartialEq)]
enum Reply {
    /// Success; for reads, the data (holes filled with zeros).
    Ok(Vec<u8>),
    /// The NBD error value.
    Err(u32),
}

impl Reply {
    fn err(&self) -> u32 {
        match self {
            Reply::Ok(_) => 0,
            Reply::Err(e) => *e,
        }
    }
}

impl Session {
    /// Handshake to transmission on `export` with NBD_OPT_GO, optionally
    /// negotiating structured replies and `base:allocation`.
    fn open(addr: &Addr, export: &str, structured: bool, meta: bool) -> Session {
        let mut raw = Raw::start(addr);
        if structured {
            assert_eq!(raw.structured(), nbd::REP_ACK, "STRUCTURED_REPLY refused");
        }
        if meta {
            let (rt, ctx) = raw.set_meta(export, &["base:allocation"]);
            assert_eq!(
                rt,
                nbd::REP_ACK,
                "SET_META_CONTEXT base:allocation: {}",
                rep_name(rt)
            );
            assert_eq!(ctx.len(), 1, "one context selected: {ctx:?}");
            assert_eq!(ctx[0].1, "base:allocation");
        }
        let (size, tflags) = raw
            .go_opt(nbd::OPT_GO, export.as_bytes())
            .unwrap_or_else(|e| panic!("GO {export}: {}", rep_name(e)));
        raw.what = format!("{} {export}", raw.what);
        Session {
            raw,
            size,
            tflags,
            structured,
            next_handle: 1,
        }
    }

    fn simple(addr: &Addr, export: &str) -> Session {
        Session::open(addr, export, false, false)
    }

    fn header(flags: u16, typ: u16, handle: u64, offset: u64, len: u32) -> [u8; 28] {
        let mut b = [0u8; 28];
        b[0..4].copy_from_slice(&nbd::REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&flags.to_be_bytes());
        b[6..8].copy_from_slice(&typ.to_be_bytes());
        b[8..16].copy_from_slice(&handle.to_be_bytes());
        b[16..24].copy_from_slice(&offset.to_be_bytes());
        b[24..28].copy_from_slice(&len.to_be_bytes());
        b
    }

    /// Sends one request (with `payload` after the header, which need not
    /// match `len`); returns its handle.
    fn send(&mut self, flags: u16, typ: u16, offset: u64, len: u32, payload: &[u8]) -> u64 {
        let h = self.next_handle;
        self.next_handle += 1;
        let mut b = Session::header(flags, typ, h, offset, len).to_vec();
        b.extend_from_slice(payload);
        self.raw.send(&b);
        h
    }

    /// Reads one reply for `handle`; `read_len` is the data length a
    /// successful simple reply carries (reads only).
    fn reply(&mut self, handle: u64, offset: u64, read_len: u64) -> Reply {
        match self.try_reply(handle, offset, read_len) {
            Ok(r) => r,
            Err(e) => panic!(
                "{}: no reply to handle {handle}: {e} (did the server hang up?)",
                self.raw.what
            ),
        }
    }

    fn try_reply(&mut self, handle: u64, offset: u64, read_len: u64) -> io::Result<Reply> {
        let magic = be32(&self.raw.try_read_n(4)?);
        match magic {
            nbd::SIMPLE_REPLY_MAGIC => {
                let h = self.raw.try_read_n(12)?;
                let err = be32(&h);
                assert_eq!(be64(&h[4..]), handle, "simple reply for the wrong handle");
                if err != 0 {
                    return Ok(Reply::Err(err));
                }
                Ok(Reply::Ok(self.raw.try_read_n(read_len as usize)?))
            }
            nbd::STRUCTURED_REPLY_MAGIC => {
                assert!(self.structured, "structured reply without negotiation");
                let mut chunks = Vec::new();
                let mut first = true;
                loop {
                    if !first {
                        let m = be32(&self.raw.try_read_n(4)?);
                        assert_eq!(m, nbd::STRUCTURED_REPLY_MAGIC, "chunk magic");
                    }
                    first = false;
                    let c = self.read_chunk_body()?;
                    assert_eq!(c.handle, handle, "chunk for the wrong handle");
                    let done = c.flags & nbd::REPLY_FLAG_DONE != 0;
                    chunks.push(c);
                    if done {
                        break;
                    }
                }
                Ok(assemble(&chunks, offset, read_len))
            }
            m => panic!("{}: bad reply magic {m:#x}", self.raw.what),
        }
    }

    fn read_chunk_body(&mut self) -> io::Result<Chunk> {
        let h = self.raw.try_read_n(16)?;
        let len = be32(&h[12..]);
        assert!(len <= MAX_REPLY, "chunk length {len} is absurd");
        Ok(Chunk {
            flags: be16(&h),
            rtype: be16(&h[2..]),
            handle: be64(&h[4..]),
            payload: self.raw.try_read_n(len as usize)?,
        })
    }

    /// Reads the raw chunks of one structured reply.
    fn chunks(&mut self, handle: u64) -> Vec<Chunk> {
        let mut v = Vec::new();
        loop {
            let m = be32(&self.raw.read_n(4, "chunk magic"));
            assert_eq!(
                m,
                nbd::STRUCTURED_REPLY_MAGIC,
                "expected a structured reply"
            );
            let c = self.read_chunk_body().expect("chunk");
            assert_eq!(c.handle, handle, "chunk for the wrong handle");
            let done = c.flags & nbd::REPLY_FLAG_DONE != 0;
            v.push(c);
            if done {
                return v;
            }
        }
    }

    fn cmd(&mut self, flags: u16, typ: u16, offset: u64, len: u32, payload: &[u8]) -> Reply {
        let read_len = if typ == nbd::CMD_READ {
            u64::from(len)
        } else {
            0
        };
        let h = self.send(flags, typ, offset, len, payload);
        self.reply(h, offset, read_len)
    }

    fn read(&mut self, offset: u64, len: u32) -> Reply {
        self.cmd(0, nbd::CMD_READ, offset, len, &[])
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Reply {
        let len = u32::try_from(data.len()).expect("write len");
        self.cmd(0, nbd::CMD_WRITE, offset, len, data)
    }

    fn read_ok(&mut self, offset: u64, len: u32) -> Vec<u8> {
        match self.read(offset, len) {
            Reply::Ok(d) => d,
            Reply::Err(e) => panic!("{}: read {offset}+{len} failed with {e}", self.raw.what),
        }
    }

    /// A normal read still works: the connection survived what came before.
    fn assert_usable(&mut self, after: &str) {
        match self.try_reply_to_read(0, 512) {
            Ok(Reply::Ok(d)) if d.len() == 512 => {}
            other => panic!(
                "{}: connection unusable after {after}: read 0+512 got {other:?}",
                self.raw.what
            ),
        }
    }

    fn try_reply_to_read(&mut self, offset: u64, len: u32) -> io::Result<Reply> {
        let h = self.next_handle;
        self.next_handle += 1;
        self.raw
            .try_send(&Session::header(0, nbd::CMD_READ, h, offset, len))?;
        self.try_reply(h, offset, u64::from(len))
    }

    fn expect(&mut self, what: &str, want: u32, got: Reply) {
        assert_eq!(
            got.err(),
            want,
            "{}: {what}: expected error {want}, got {:?}",
            self.raw.what,
            abbreviate(&got)
        );
    }

    fn disconnect(mut self) {
        self.send(0, nbd::CMD_DISC, 0, 0, &[]);
        assert!(self.raw.closes(), "server did not close after NBD_CMD_DISC");
    }
}

fn abbreviate(r: &Reply) -> String {
    match r {
        Reply::Ok(d) => format!("Ok({} bytes)", d.len()),
        Reply::Err(e) => format!("Err({e})"),
    }
}

/// Turns the chunks of one structured reply into a [`Reply`], checking
/// the spec's rules for read chunks on the way.
fn assemble(chunks: &[Chunk], offset: u64, read_len: u64) -> Reply {
    let mut err = 0;
    let mut data = vec![0u8; read_len as usize];
    let mut covered = Vec::new();
    for c in chunks {
        match c.rtype {
            nbd::REPLY_TYPE_NONE => {
                assert!(c.payload.is_empty(), "NONE chunk with payload");
                assert!(
                    c.flags & nbd::REPLY_FLAG_DONE != 0,
                    "NONE chunk without DONE"
                );
            }
            nbd::REPLY_TYPE_ERROR | nbd::REPLY_TYPE_ERROR_OFFSET => {
                assert!(c.payload.len() >= 6, "error chunk too short");
                let e = be32(&c.payload);
                assert!(e != 0, "error chunk with error 0");
                let mlen = be16(&c.payload[4..]) as usize;
                assert!(mlen + 6 <= c.payload.len(), "error message overruns chunk");
                if err == 0 {
                    err = e;
                }
            }
            nbd::REPLY_TYPE_OFFSET_DATA => {
                assert!(c.payload.len() > 8, "OFFSET_DATA chunk too short");
                let off = be64(&c.payload);
                let n = (c.payload.len() - 8) as u64;
                covered.push((off, n));
            }
            nbd::REPLY_TYPE_OFFSET_HOLE => {
                assert_eq!(c.payload.len(), 12, "OFFSET_HOLE chunk length");
                let n = u64::from(be32(&c.payload[8..]));
                assert!(n > 0, "zero-length hole chunk");
                covered.push((be64(&c.payload), n));
            }
            nbd::REPLY_TYPE_BLOCK_STATUS => {}
            t => panic!("unexpected structured reply type {t:#x}"),
        }
    }
    if err != 0 {
        return Reply::Err(err);
    }
    if read_len == 0 {
        return Reply::Ok(Vec::new());
    }
    // Chunk offsets are absolute: together they must tile exactly
    // [offset, offset + read_len).
    covered.sort();
    let mut pos = offset;
    for (o, n) in &covered {
        assert_eq!(
            *o, pos,
            "read chunks overlap, leave a gap or stray at {pos}"
        );
        pos += n;
    }
    assert_eq!(
        pos - offset,
        read_len,
        "read chunks cover {} of {read_len} bytes",
        pos - offset
    );
    for c in chunks {
        if c.rtype == nbd::REPLY_TYPE_OFFSET_DATA {
            let at = (be64(&c.payload) - offset) as usize;
            data[at..at + c.payload.len() - 8].copy_from_slice(&c.payload[8..]);
        }
    }
    Reply::Ok(data)
}

/// Resident memory of `pid` in KiB, from /proc.
fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// What a check runs against.
struct Target {
    addr: Addr,
    export: String,
    size: u64,
    /// lungate itself (true) or a reference server (false): lungate is
    /// also held to its own promises where the spec leaves a choice.
    lungate: bool,
    /// The server process, to watch its memory.
    pid: u32,
}

// ------------------------------------------------------------------ checks

/// Requests at, across and past the end, and offsets that overflow, get the
/// spec's errors (EINVAL for read/trim/cache/block status, ENOSPC for
/// write/write zeroes) and write nothing; the last block is writable.
fn check_bounds(t: &Target) {
    let mut s = Session::simple(&t.addr, &t.export);
    assert_eq!(s.size, t.size, "export size");
    assert!(t.size < 1 << 32, "test export must be smaller than 4 GiB");
    let size = t.size;
    let last = pattern_bytes(4096, size ^ 0x1a57);
    let r = s.write(size - 4096, &last);
    s.expect("write last 4K", 0, r);
    assert_eq!(s.read_ok(size - 4096, 4096), last, "last 4K reads back");
    let first = pattern_bytes(4096, size ^ 0xf175);
    let r = s.write(0, &first);
    s.expect("write first 4K", 0, r);

    let junk = pattern_bytes(8192, 7);
    let past: [(&str, u64, u32); 6] = [
        ("at the end", size, 512),
        ("across the end by 512", size - 512, 1024),
        ("across the end by 1", size - 4095, 4096),
        ("at offset u64::MAX", u64::MAX, 1),
        ("wrapping past u64::MAX", u64::MAX - 100, 4096),
        ("at offset 2^63", 1 << 63, 512),
    ];
    for (what, off, len) in past {
        let r = s.read(off, len);
        s.expect(&format!("read {what} ({off}+{len})"), nbd::EINVAL, r);
        let r = s.cmd(0, nbd::CMD_WRITE, off, len, &junk[..len as usize]);
        s.expect(&format!("write {what} ({off}+{len})"), nbd::ENOSPC, r);
        let r = s.cmd(0, nbd::CMD_TRIM, off, len, &[]);
        s.expect(&format!("trim {what} ({off}+{len})"), nbd::EINVAL, r);
        let r = s.cmd(0, nbd::CMD_WRITE_ZEROES, off, len, &[]);
        s.expect(
            &format!("write zeroes {what} ({off}+{len})"),
            nbd::ENOSPC,
            r,
        );
        let r = s.cmd(0, nbd::CMD_CACHE, off, len, &[]);
        assert!(r.err() != 0, "cache {what} ({off}+{len}) succeeded");
        s.assert_usable(&format!("requests {what}"));
    }
    // Reads far larger than the export (no payload is involved).
    let r = s.read(0, u32::MAX);
    s.expect("read 0+u32::MAX", nbd::EINVAL, r);
    let r = s.cmd(0, nbd::CMD_TRIM, 0, u32::MAX, &[]);
    s.expect("trim 0+u32::MAX", nbd::EINVAL, r);
    let r = s.cmd(0, nbd::CMD_WRITE_ZEROES, 0, u32::MAX, &[]);
    s.expect("write zeroes 0+u32::MAX", nbd::ENOSPC, r);
    s.assert_usable("u32::MAX lengths");

    assert_eq!(
        s.read_ok(size - 4096, 4096),
        last,
        "refused requests changed the last 4K"
    );
    assert_eq!(
        s.read_ok(0, 4096),
        first,
        "refused requests changed the first 4K"
    );
    s.disconnect();
}

/// Zero-length requests: the spec leaves the result open but says the
/// server SHOULD NOT disconnect; lungate must answer each and go on.
fn check_zero_lengths(t: &Target) {
    let mut s = Session::simple(&t.addr, &t.export);
    for off in [0, t.size / 2, t.size] {
        for (name, typ) in [
            ("read", nbd::CMD_READ),
            ("write", nbd::CMD_WRITE),
            ("trim", nbd::CMD_TRIM),
            ("write zeroes", nbd::CMD_WRITE_ZEROES),
            ("cache", nbd::CMD_CACHE),
        ] {
            let r = s.cmd(0, typ, off, 0, &[]);
            if let Reply::Ok(d) = &r {
                assert!(d.is_empty(), "zero-length {name} returned data");
            }
            s.assert_usable(&format!("zero-length {name} at {off} ({r:?})"));
        }
    }
    s.disconnect();

    let mut s = Session::open(&t.addr, &t.export, true, true);
    let h = s.send(0, nbd::CMD_BLOCK_STATUS, 0, 0, &[]);
    let _ = s.chunks(h);
    s.assert_usable("zero-length block status");
    let h = s.send(0, nbd::CMD_READ, 0, 0, &[]);
    let _ = s.chunks(h);
    s.assert_usable("zero-length structured read");
    s.disconnect();
}

/// Unknown commands and flags get EINVAL and the connection goes on;
/// a write with a bad flag still has its payload consumed, not executed.
fn check_unknown_commands_and_flags(t: &Target) {
    let mut s = Session::simple(&t.addr, &t.export);
    let before = s.read_ok(4096, 4096);
    for typ in [8u16, 99, 0x7fff, 0xffff] {
        let r = s.cmd(0, typ, 0, 0, &[]);
        s.expect(&format!("unknown command type {typ}"), nbd::EINVAL, r);
        s.assert_usable(&format!("unknown command {typ}"));
    }
    for flag in [1u16 << 7, 1 << 12, 1 << 15] {
        let r = s.cmd(flag, nbd::CMD_READ, 0, 512, &[]);
        s.expect(&format!("read with unknown flag {flag:#x}"), nbd::EINVAL, r);
    }
    let r = s.cmd(nbd::CMD_FLAG_NO_HOLE, nbd::CMD_READ, 0, 512, &[]);
    s.expect("read with NO_HOLE", nbd::EINVAL, r);
    let r = s.cmd(nbd::CMD_FLAG_REQ_ONE, nbd::CMD_READ, 0, 512, &[]);
    s.expect("read with REQ_ONE", nbd::EINVAL, r);
    assert!(
        s.tflags & nbd::TFLAG_SEND_DF == 0,
        "SEND_DF without structured replies"
    );
    let r = s.cmd(nbd::CMD_FLAG_DF, nbd::CMD_READ, 0, 512, &[]);
    s.expect("read with DF on a simple-reply connection", nbd::EINVAL, r);
    let junk = pattern_bytes(4096, 99);
    let r = s.cmd(1 << 15, nbd::CMD_WRITE, 4096, 4096, &junk);
    s.expect("write with unknown flag", nbd::EINVAL, r);
    s.assert_usable("write with an unknown flag (payload must be skipped)");
    let r = s.cmd(nbd::CMD_FLAG_DF, nbd::CMD_WRITE, 4096, 4096, &junk);
    s.expect("write with DF", nbd::EINVAL, r);
    s.assert_usable("write with DF");
    assert_eq!(
        s.read_ok(4096, 4096),
        before,
        "a refused write changed data"
    );
    // BLOCK_STATUS with no meta context negotiated: SHOULD EINVAL.
    let r = s.cmd(0, nbd::CMD_BLOCK_STATUS, 0, 4096, &[]);
    s.expect(
        "block status without meta context (simple replies)",
        nbd::EINVAL,
        r,
    );
    s.assert_usable("block status without meta context");
    // FUA is valid for all commands when SEND_FUA is advertised.
    let r = s.cmd(nbd::CMD_FLAG_FUA, nbd::CMD_READ, 0, 512, &[]);
    assert_eq!(
        r.err(),
        0,
        "read with FUA (spec: MUST accept) got {}",
        r.err()
    );
    s.disconnect();

    let mut s = Session::open(&t.addr, &t.export, true, false);
    let r = s.cmd(0, nbd::CMD_BLOCK_STATUS, 0, 4096, &[]);
    s.expect(
        "block status without meta context (structured)",
        nbd::EINVAL,
        r,
    );
    s.assert_usable("block status without meta context");
    s.disconnect();
}

/// Structured replies: errors arrive as error chunks with DONE, reads are
/// covered exactly, DF gives one content chunk, block status behaves.
fn check_structured(t: &Target) {
    let mut s = Session::open(&t.addr, &t.export, true, true);
    assert!(
        s.tflags & nbd::TFLAG_SEND_DF != 0,
        "SEND_DF with structured replies"
    );
    let data = pattern_bytes(64 * KIB as usize, 3);
    let r = s.write(MIB, &data);
    s.expect("write 64K", 0, r);
    match s.read(MIB, 64 * KIB as u32) {
        Reply::Ok(d) => assert_eq!(d, data, "structured read returns the data"),
        e => panic!("structured read: {e:?}"),
    }
    let h = s.send(nbd::CMD_FLAG_DF, nbd::CMD_READ, MIB, 64 * KIB as u32, &[]);
    let chunks = s.chunks(h);
    let content: Vec<_> = chunks
        .iter()
        .filter(|c| {
            matches!(
                c.rtype,
                nbd::REPLY_TYPE_OFFSET_DATA | nbd::REPLY_TYPE_OFFSET_HOLE
            )
        })
        .collect();
    assert_eq!(
        content.len(),
        1,
        "DF read: one content chunk, got {chunks:?}"
    );
    assert_eq!(&content[0].payload[8..], &data[..], "DF read data");

    let h = s.send(0, nbd::CMD_READ, t.size, 512, &[]);
    let chunks = s.chunks(h);
    assert!(
        chunks.iter().all(|c| !matches!(
            c.rtype,
            nbd::REPLY_TYPE_OFFSET_DATA | nbd::REPLY_TYPE_OFFSET_HOLE
        )),
        "a refused read sent content: {chunks:?}"
    );
    let e = chunks
        .iter()
        .find(|c| c.rtype & (1 << 15) != 0)
        .unwrap_or_else(|| panic!("read past the end: no error chunk in {chunks:?}"));
    assert_eq!(
        be32(&e.payload),
        nbd::EINVAL,
        "read past the end: error chunk value"
    );

    for (off, len, what) in [
        (t.size, 512u32, "at the end"),
        (u64::MAX - 100, 4096, "wrapping u64"),
    ] {
        let r = s.cmd(0, nbd::CMD_BLOCK_STATUS, off, len, &[]);
        s.expect(&format!("block status {what}"), nbd::EINVAL, r);
    }
    let h = s.send(nbd::CMD_FLAG_REQ_ONE, nbd::CMD_BLOCK_STATUS, 0, 8192, &[]);
    let chunks = s.chunks(h);
    let bs: Vec<_> = chunks
        .iter()
        .filter(|c| c.rtype == nbd::REPLY_TYPE_BLOCK_STATUS)
        .collect();
    assert_eq!(
        bs.len(),
        1,
        "one block status chunk per context: {chunks:?}"
    );
    assert_eq!(bs[0].payload.len(), 12, "REQ_ONE: exactly one descriptor");
    let elen = be32(&bs[0].payload[4..]);
    assert!(
        elen > 0 && elen <= 8192,
        "REQ_ONE extent length {elen} within request"
    );
    // Unknown flag on block status.
    let r = s.cmd(1 << 14, nbd::CMD_BLOCK_STATUS, 0, 4096, &[]);
    s.expect("block status with unknown flag", nbd::EINVAL, r);
    s.assert_usable("structured errors");
    s.disconnect();
}

/// Many requests in flight at once, valid and invalid mixed, each handle
/// answered exactly once with the right result.
fn check_pipelined(t: &Target) {
    let mut s = Session::simple(&t.addr, &t.export);
    let blk = pattern_bytes(4096, 0x9e);
    let r = s.write(2 * MIB, &blk);
    s.expect("seed block", 0, r);
    let mut want = std::collections::HashMap::new();
    let mut frames = Vec::new();
    for i in 0..96u64 {
        let h = 1000 + i;
        let (flags, typ, off, len, payload, expect): (u16, u16, u64, u32, Vec<u8>, (u32, u64)) =
            match i % 6 {
                0 => (0, nbd::CMD_READ, 2 * MIB, 4096, vec![], (0, 4096)),
                1 => (0, nbd::CMD_READ, t.size, 512, vec![], (nbd::EINVAL, 0)),
                2 => (
                    0,
                    nbd::CMD_WRITE,
                    3 * MIB + i * 4096,
                    4096,
                    pattern_bytes(4096, i),
                    (0, 0),
                ),
                3 => (0, 99, 0, 0, vec![], (nbd::EINVAL, 0)),
                4 => (
                    0,
                    nbd::CMD_WRITE,
                    t.size - 512,
                    1024,
                    vec![0xee; 1024],
                    (nbd::ENOSPC, 0),
                ),
                _ => (0, nbd::CMD_FLUSH, 0, 0, vec![], (0, 0)),
            };
        want.insert(h, expect);
        frames.extend_from_slice(&Session::header(flags, typ, h, off, len));
        frames.extend_from_slice(&payload);
    }
    s.raw.send(&frames);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..want.len() {
        let m = be32(&s.raw.read_n(4, "pipelined reply magic"));
        assert_eq!(m, nbd::SIMPLE_REPLY_MAGIC, "pipelined reply magic");
        let hdr = s.raw.read_n(12, "pipelined reply");
        let (err, h) = (be32(&hdr), be64(&hdr[4..]));
        let (werr, dlen) = *want
            .get(&h)
            .unwrap_or_else(|| panic!("reply for a handle never sent: {h}"));
        assert!(seen.insert(h), "handle {h} answered twice");
        assert_eq!(err, werr, "pipelined handle {h}: error");
        if err == 0 && dlen > 0 {
            let d = s.raw.read_n(dlen as usize, "pipelined read data");
            assert_eq!(d, blk, "pipelined read data for handle {h}");
        }
    }
    for i in (0..96u64).filter(|i| i % 6 == 2) {
        assert_eq!(
            s.read_ok(3 * MIB + i * 4096, 4096),
            pattern_bytes(4096, i),
            "pipelined write {i} landed"
        );
    }
    s.disconnect();
}

/// Option haggling: unknown options get ERR_UNSUP and the next option
/// works; bad names get ERR_UNKNOWN; lying lengths get ERR_INVALID;
/// ABORT gets ACK.
fn check_options(t: &Target, other_exports: &[&str]) {
    let mut r = Raw::start(&t.addr);
    for opt in [0x7777u32, 4, 0xffff_fffe] {
        assert_eq!(
            rep_name(r.opt_final(opt, &[])),
            "ERR_UNSUP",
            "unknown option {opt:#x}"
        );
        assert_eq!(
            rep_name(r.opt_final(opt, &pattern_bytes(300, 1))),
            "ERR_UNSUP",
            "unknown option {opt:#x} with 300 bytes of data"
        );
    }
    // The connection is still usable: LIST works and lists the export.
    r.send_opt(nbd::OPT_LIST, &[]);
    let rs = r.opt_replies(nbd::OPT_LIST);
    assert_eq!(
        rs.last().expect("final").rtype,
        nbd::REP_ACK,
        "LIST after unknown options"
    );
    let names: Vec<String> = rs
        .iter()
        .filter(|x| x.rtype == nbd::REP_SERVER)
        .map(|x| {
            let n = be32(&x.data) as usize;
            assert!(
                n + 4 <= x.data.len(),
                "REP_SERVER name length overruns reply"
            );
            String::from_utf8_lossy(&x.data[4..4 + n]).into_owned()
        })
        .collect();
    assert!(
        names.contains(&t.export),
        "LIST {names:?} lacks {}",
        t.export
    );
    assert_eq!(
        rep_name(r.opt_final(nbd::OPT_LIST, b"junk")),
        "ERR_INVALID",
        "LIST with data"
    );
    assert_eq!(
        rep_name(r.opt_final(nbd::OPT_STRUCTURED_REPLY, b"junk")),
        "ERR_INVALID",
        "STRUCTURED_REPLY with data"
    );
    let st = r.opt_final(nbd::OPT_STARTTLS, &[]);
    assert!(
        st == nbd::REP_ERR_POLICY || st == nbd::REP_ERR_UNSUP,
        "STARTTLS without TLS configured: {}",
        rep_name(st)
    );
    // Unknown exports.
    let mut bad: Vec<Vec<u8>> = vec![
        format!("{}-nope", t.export).into_bytes(),
        b"no-such-lun/disk0".to_vec(),
    ];
    if t.lungate {
        let (lun, _) = t.export.split_once('/').expect("NAME/diskN");
        bad.extend(
            [
                format!("../{}", t.export),
                format!("./{}", t.export),
                format!("{}/", t.export),
                format!("/{}", t.export),
                format!("{lun}/disk99"),
                format!("{lun}/disk4294967296"),
                format!("{lun}/disk-1"),
                format!("{lun}/../{}", t.export),
                format!("{lun}.lun/disk0"),
                lun.to_string(),
                String::new(),
            ]
            .map(String::into_bytes),
        );
        bad.push(format!("{}\0", t.export).into_bytes());
        bad.push(vec![b'a'; 5000]);
        bad.push(vec![0xff, 0xfe, b'/', b'd']);
    }
    for name in &bad {
        for opt in [nbd::OPT_INFO, nbd::OPT_GO] {
            let got = r.go_opt(opt, name);
            let shown = String::from_utf8_lossy(&name[..name.len().min(40)]).into_owned();
            match got {
                Err(e) => {
                    assert!(e & (1 << 31) != 0, "{opt} {shown:?}: non-error final reply");
                    if name.len() <= 4096 && !name.contains(&0) && std::str::from_utf8(name).is_ok()
                    {
                        assert_eq!(
                            e,
                            nbd::REP_ERR_UNKNOWN,
                            "INFO/GO of unknown export {shown:?}: {}",
                            rep_name(e)
                        );
                    }
                }
                Ok(x) => panic!("INFO/GO of {shown:?} accepted: {x:?}"),
            }
        }
    }
    // GO whose name length field lies about the option length.
    let mut d = Raw::go_data(t.export.as_bytes());
    d[0..4].copy_from_slice(&1000u32.to_be_bytes());
    assert_eq!(
        rep_name(r.opt_final(nbd::OPT_GO, &d)),
        "ERR_INVALID",
        "GO with name length beyond the option"
    );
    // SET_META_CONTEXT before STRUCTURED_REPLY: SHOULD ERR_INVALID.
    let (rt, ctx) = r.set_meta(&t.export, &["base:allocation"]);
    assert_eq!(
        rep_name(rt),
        "ERR_INVALID",
        "SET_META_CONTEXT before STRUCTURED_REPLY"
    );
    assert!(ctx.is_empty(), "contexts selected anyway: {ctx:?}");
    assert_eq!(r.structured(), nbd::REP_ACK, "STRUCTURED_REPLY");
    // Query length beyond the option: MUST ERR_INVALID.
    let mut d = Vec::new();
    d.extend_from_slice(&(t.export.len() as u32).to_be_bytes());
    d.extend_from_slice(t.export.as_bytes());
    d.extend_from_slice(&1u32.to_be_bytes());
    d.extend_from_slice(&500u32.to_be_bytes());
    d.extend_from_slice(b"base:allocation");
    assert_eq!(
        rep_name(r.opt_final(nbd::OPT_SET_META_CONTEXT, &d)),
        "ERR_INVALID",
        "SET_META_CONTEXT with a query length beyond the option"
    );
    // A real export after all that, then a real request.
    let (size, _) = r
        .go_opt(nbd::OPT_GO, t.export.as_bytes())
        .unwrap_or_else(|e| panic!("GO {} after bad options: {}", t.export, rep_name(e)));
    assert_eq!(size, t.size);
    let mut s = Session {
        raw: r,
        size,
        tflags: 0,
        structured: true,
        next_handle: 1,
    };
    s.assert_usable("option haggling abuse");
    s.disconnect();

    // Other exports on the server are reachable by their exact names.
    for e in other_exports {
        let mut r = Raw::start(&t.addr);
        assert!(r.go_opt(nbd::OPT_INFO, e.as_bytes()).is_ok(), "INFO {e}");
    }

    // ABORT: MUST reply ACK.
    let mut r = Raw::start(&t.addr);
    r.send_opt(nbd::OPT_ABORT, &[]);
    match r.try_opt_reply() {
        Ok(x) => assert_eq!(rep_name(x.rtype), "ACK", "ABORT reply"),
        Err(e) => panic!("ABORT: no ACK ({e})"),
    }

    // EXPORT_NAME of an unknown export: the server MUST hang up.
    let mut r = Raw::start(&t.addr);
    r.send_opt(nbd::OPT_EXPORT_NAME, b"no-such-lun/disk0");
    assert!(
        r.closes(),
        "EXPORT_NAME of an unknown export did not end the session"
    );

    // EXPORT_NAME of the real export works (legacy path, NO_ZEROES honoured).
    let mut r = Raw::start(&t.addr);
    r.send_opt(nbd::OPT_EXPORT_NAME, t.export.as_bytes());
    let info = r.read_n(10, "EXPORT_NAME reply");
    assert_eq!(be64(&info), t.size, "EXPORT_NAME size");
    if r.hs_flags & nbd::FLAG_NO_ZEROES == 0 {
        r.read_n(124, "EXPORT_NAME zero padding");
    }
    let mut s = Session {
        raw: r,
        size: t.size,
        tflags: be16(&info[8..]),
        structured: false,
        next_handle: 1,
    };
    s.assert_usable("EXPORT_NAME");
    s.disconnect();

    // Unknown client flags: the server MUST drop the connection.
    let mut r = Raw::connect(&t.addr);
    r.send(&(nbd::FLAG_C_FIXED_NEWSTYLE | 1 << 9).to_be_bytes());
    let _ = r.try_send(&{
        let mut b = nbd::IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&nbd::OPT_LIST.to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes());
        b
    });
    assert!(r.closes(), "unknown client flags accepted");

    // A long run of pipelined options: each answered in order until the
    // server decides the client is a nuisance and hangs up (the spec
    // allows that for denial of service; nbdkit does it after 32).
    let mut r = Raw::start(&t.addr);
    let mut burst = Vec::new();
    for _ in 0..500 {
        burst.extend_from_slice(&nbd::IHAVEOPT.to_be_bytes());
        burst.extend_from_slice(&0x4242u32.to_be_bytes());
        burst.extend_from_slice(&0u32.to_be_bytes());
    }
    let _ = r.try_send(&burst);
    let mut answered = 0;
    while answered < 500 {
        match r.try_opt_reply() {
            Ok(x) => {
                assert_eq!(
                    rep_name(x.rtype),
                    "ERR_UNSUP",
                    "pipelined unknown option {answered}"
                );
                answered += 1;
            }
            Err(e) => {
                assert!(
                    matches!(
                        e.kind(),
                        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
                    ),
                    "pipelined options: {e} after {answered} replies"
                );
                break;
            }
        }
    }
    assert!(
        answered >= 16,
        "only {answered} of 500 pipelined options answered"
    );
}

/// Garbage and truncated frames: the server hangs up where framing is
/// lost and keeps serving others.
fn check_garbage(t: &Target) {
    // Truncated request headers and payloads, then close.
    for cut in [1usize, 4, 13, 27] {
        let mut s = Session::simple(&t.addr, &t.export);
        let hdr = Session::header(0, nbd::CMD_READ, 1, 0, 512);
        let _ = s.raw.try_send(&hdr[..cut]);
        drop(s);
    }
    let mut s = Session::simple(&t.addr, &t.export);
    let mut b = Session::header(0, nbd::CMD_WRITE, 1, 8192, 4096).to_vec();
    b.extend_from_slice(&[0xab; 100]);
    let _ = s.raw.try_send(&b);
    drop(s);
    // Truncated handshakes.
    for cut in [0usize, 2, 7, 15] {
        let mut r = Raw::start(&t.addr);
        let mut b = nbd::IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&nbd::OPT_GO.to_be_bytes());
        b.extend_from_slice(&100u32.to_be_bytes());
        let _ = r.try_send(&b[..cut]);
    }
    let r = Raw::connect(&t.addr);
    drop(r);

    // Bad request magic: framing is lost, the server must hang up.
    let mut s = Session::simple(&t.addr, &t.export);
    let mut b = Session::header(0, nbd::CMD_READ, 1, 0, 512);
    b[0..4].copy_from_slice(&0x1256_0953u32.to_be_bytes());
    let _ = s.raw.try_send(&b);
    assert!(
        s.raw.closes(),
        "bad request magic answered instead of hanging up"
    );

    // Bad option magic during haggling.
    let mut r = Raw::start(&t.addr);
    let _ = r.try_send(&[0x42; 16]);
    assert!(
        r.closes(),
        "bad option magic answered instead of hanging up"
    );

    // Random bytes instead of client flags.
    let mut r = Raw::connect(&t.addr);
    let _ = r.try_send(&pattern_bytes(4000, 11));
    assert!(r.closes(), "garbage handshake did not end the session");

    // Alive and serving.
    let mut s = Session::simple(&t.addr, &t.export);
    s.assert_usable("garbage on other connections");
    s.disconnect();
}

/// Writes and options whose length fields claim far more than any sane
/// request (up to ~4 GiB) that never arrives: the server must answer with
/// an error or hang up (the spec allows a hard disconnect for denial of
/// service) within the client's reply timeout, not sit waiting for the
/// bytes, and must not allocate them. For options the handshake deadline
/// counts as hanging up (the hostile test runs lungate with a 3 s one);
/// the transmission phase has no deadline, so an absurd WRITE must be
/// answered or dropped on its own merits.
fn check_absurd_lengths(t: &Target) {
    let rss0 = rss_kib(t.pid);
    // A write claiming u32::MAX bytes of payload that never come.
    let mut s = Session::simple(&t.addr, &t.export);
    let mut b = Session::header(0, nbd::CMD_WRITE, 7, 0, u32::MAX).to_vec();
    b.extend_from_slice(&pattern_bytes(4096, 5));
    let _ = s.raw.try_send(&b);
    match s.try_reply(7, 0, 0) {
        Ok(r) => assert!(r.err() != 0, "write of u32::MAX bytes at 0 succeeded"),
        Err(e) => assert!(
            matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
            ),
            "write of u32::MAX bytes: server neither replied nor hung up: {e}"
        ),
    }
    drop(s);

    // A write of 1 GiB (beyond the export) with 1 MiB of payload, then
    // the client vanishes.
    let mut s = Session::simple(&t.addr, &t.export);
    let mut b = Session::header(0, nbd::CMD_WRITE, 1, 0, 1 << 30).to_vec();
    b.extend_from_slice(&pattern_bytes(MIB as usize, 6));
    // The server may hang up before taking it all.
    let _ = s.raw.try_send(&b);
    drop(s);

    // An in-bounds write larger than any sane request (the whole export
    // when it is above 32 MiB), payload sent in full: answered either way.
    let mut s = Session::simple(&t.addr, &t.export);
    // Leaves the last MiB alone: the region-end check reads it later.
    let big = u32::try_from((t.size - MIB).min(48 * MIB)).expect("fits");
    let before = s.read_ok(0, 4096);
    let payload = vec![0x5au8; big as usize];
    let h = s.send(0, nbd::CMD_WRITE, 0, big, &payload);
    drop(payload);
    match s.try_reply(h, 0, 0) {
        Ok(Reply::Ok(_)) => assert_eq!(s.read_ok(0, 4096), vec![0x5a; 4096], "big write landed"),
        Ok(Reply::Err(e)) => {
            assert_eq!(e, nbd::EINVAL, "oversized in-bounds write: error");
            assert_eq!(s.read_ok(0, 4096), before, "refused big write changed data");
        }
        Err(e) => assert!(
            matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
            ),
            "oversized write: {e}"
        ),
    }
    drop(s);

    // An in-bounds read of the same size: data or EINVAL/EOVERFLOW, never
    // a short reply.
    let mut s = Session::simple(&t.addr, &t.export);
    match s.read(0, big) {
        Reply::Ok(d) => assert_eq!(d.len(), big as usize),
        Reply::Err(e) => assert!(e == nbd::EINVAL || e == nbd::EOVERFLOW, "big read: {e}"),
    }
    s.disconnect();

    // An option whose length claims ~4 GiB that never comes.
    for opt in [
        0x7777u32,
        nbd::OPT_GO,
        nbd::OPT_EXPORT_NAME,
        nbd::OPT_SET_META_CONTEXT,
    ] {
        let mut r = Raw::start(&t.addr);
        r.send_opt_header(opt, 0xffff_fff0);
        let _ = r.try_send(&[0u8; 64]);
        match r.try_opt_reply() {
            Ok(x) => assert!(
                x.rtype & (1 << 31) != 0,
                "option {opt} with absurd length: {}",
                rep_name(x.rtype)
            ),
            Err(e) => assert!(
                matches!(
                    e.kind(),
                    io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
                ),
                "option {opt} with absurd length: server neither replied nor hung up: {e}"
            ),
        }
    }
    let mut s = Session::simple(&t.addr, &t.export);
    s.assert_usable("absurd lengths on other connections");
    s.disconnect();
    let rss1 = rss_kib(t.pid);
    assert!(
        rss1 < rss0 + 512 * 1024,
        "server memory grew from {rss0} KiB to {rss1} KiB after absurd lengths"
    );
}

/// A read-only export: writes, trims and zeroes get EPERM; reads work.
fn check_read_only(t: &Target) {
    let mut s = Session::simple(&t.addr, &t.export);
    assert!(
        s.tflags & nbd::TFLAG_READ_ONLY != 0,
        "READ_ONLY flag not advertised"
    );
    let before = s.read_ok(0, 8192);
    let r = s.write(0, &pattern_bytes(4096, 1));
    s.expect("write to read-only export", nbd::EPERM, r);
    s.assert_usable("refused write");
    let r = s.cmd(
        nbd::CMD_FLAG_FUA,
        nbd::CMD_WRITE,
        4096,
        4096,
        &pattern_bytes(4096, 2),
    );
    s.expect("FUA write to read-only export", nbd::EPERM, r);
    let r = s.cmd(0, nbd::CMD_TRIM, 0, 8192, &[]);
    s.expect("trim on read-only export", nbd::EPERM, r);
    let r = s.cmd(0, nbd::CMD_WRITE_ZEROES, 0, 8192, &[]);
    s.expect("write zeroes on read-only export", nbd::EPERM, r);
    let r = s.cmd(nbd::CMD_FLAG_NO_HOLE, nbd::CMD_WRITE_ZEROES, 0, 8192, &[]);
    s.expect("write zeroes NO_HOLE on read-only export", nbd::EPERM, r);
    let r = s.cmd(0, nbd::CMD_WRITE, t.size, 512, &[0; 512]);
    assert!(
        r.err() != 0,
        "write past the end of a read-only export succeeded"
    );
    let r = s.cmd(0, nbd::CMD_FLUSH, 0, 0, &[]);
    assert_eq!(r.err(), 0, "flush on a read-only export");
    assert_eq!(s.read_ok(0, 8192), before, "read-only export changed");
    s.disconnect();
}

/// An export larger than 4 GiB: offsets above 2^32 work and are not
/// truncated to 32 bits, the end is still enforced, and a read of 4 GiB
/// (inside the export, beyond the advertised maximum block size) is refused
/// instead of being sent.
fn check_huge(t: &Target) {
    assert!(t.size > 1 << 32, "check_huge needs an export above 4 GiB");
    let mut s = Session::simple(&t.addr, &t.export);
    let above = (1u64 << 32) + 8192;
    let data = pattern_bytes(4096, 0xb16);
    let r = s.write(above, &data);
    s.expect("write above 4 GiB", 0, r);
    assert_eq!(s.read_ok(above, 4096), data, "read above 4 GiB");
    assert_eq!(
        s.read_ok(8192, 4096),
        vec![0; 4096],
        "write above 4 GiB aliased to 2^32 lower"
    );
    let last = pattern_bytes(4096, t.size ^ 0x1a57);
    let r = s.write(t.size - 4096, &last);
    s.expect("write the last 4K", 0, r);
    let r = s.read(t.size, 512);
    s.expect("read at the end", nbd::EINVAL, r);
    let r = s.cmd(0, nbd::CMD_WRITE, t.size - 512, 1024, &[0xee; 1024]);
    s.expect("write across the end", nbd::ENOSPC, r);
    let r = s.cmd(0, nbd::CMD_WRITE, t.size + (1 << 32), 512, &[0xee; 512]);
    s.expect("write 4 GiB past the end", nbd::ENOSPC, r);
    let r = s.read(u64::MAX - 100, 4096);
    s.expect("read wrapping u64", nbd::EINVAL, r);
    let r = s.read(0, u32::MAX);
    s.expect(
        "read of u32::MAX bytes (beyond the maximum block size)",
        nbd::EINVAL,
        r,
    );
    s.assert_usable("huge export checks");
    assert_eq!(s.read_ok(t.size - 4096, 4096), last, "last block");
    s.disconnect();
}

/// The aligned layout's shadowed first MiB of disk0 (`shadow` bytes): the
/// guest's own partition table lives in the state region's shadow area,
/// while the LUN file keeps lungate's MBR, GPT and label there. Run on a
/// fresh LUN: the guest first sees zeros there (never the host's GPT or
/// label); then every command that touches the range, alone or across its
/// end, reads back what it wrote, block status calls it data, and the
/// caller's hidden digest proves that none of it reached the LUN's GPT,
/// label or state records.
fn check_shadow(t: &Target, shadow: u64) {
    let mut s = Session::open(&t.addr, &t.export, true, true);
    let sh = u32::try_from(shadow).expect("shadow fits a request");
    assert!(
        s.read_ok(0, sh).iter().all(|&b| b == 0),
        "{}: a fresh aligned disk0 does not read zeros in its first MiB",
        t.export
    );
    // The guest's own MBR and GPT header, where the host's sit in the file.
    let mut table = pattern_bytes(34 * 512, 0x7ab1e);
    table[510..512].copy_from_slice(&[0x55, 0xaa]);
    table[512..520].copy_from_slice(b"EFI PART");
    let r = s.cmd(
        nbd::CMD_FLAG_FUA,
        nbd::CMD_WRITE,
        0,
        table.len() as u32,
        &table,
    );
    s.expect("write the guest's partition table", 0, r);
    assert_eq!(s.read_ok(0, table.len() as u32), table);
    // Across the end of the shadowed range, and one write over all of it.
    let across = pattern_bytes(256 * KIB as usize, 0xac);
    let r = s.write(shadow - 128 * KIB, &across);
    s.expect("write across the shadow's end", 0, r);
    assert_eq!(s.read_ok(shadow - 128 * KIB, 256 * KIB as u32), across);
    let big = pattern_bytes(2 * shadow as usize, 0xb16);
    let r = s.write(0, &big);
    s.expect("write the shadow and the MiB after it", 0, r);
    assert_eq!(s.read_ok(0, 2 * sh), big);
    // Trim and write zeroes across the boundary, with flags.
    let r = s.cmd(0, nbd::CMD_TRIM, shadow - 4096, 8192, &[]);
    s.expect("trim across the shadow's end", 0, r);
    let r = s.cmd(
        nbd::CMD_FLAG_FUA | nbd::CMD_FLAG_NO_HOLE,
        nbd::CMD_WRITE_ZEROES,
        0,
        4096,
        &[],
    );
    s.expect("write zeroes at 0", 0, r);
    let got = s.read_ok(0, 2 * sh);
    let mut want = big.clone();
    want[..4096].fill(0);
    want[(shadow - 4096) as usize..(shadow + 4096) as usize].fill(0);
    assert!(got == want, "{}: trim/zero across the shadow", t.export);
    let r = s.cmd(0, nbd::CMD_CACHE, 0, 2 * sh, &[]);
    s.expect("cache over the shadow", 0, r);
    // Block status: the shadowed range is data whatever it holds; the
    // trimmed 4 KiB after it is a hole.
    let h = s.send(0, nbd::CMD_BLOCK_STATUS, 0, sh + 4096, &[]);
    let chunks = s.chunks(h);
    let bs = chunks
        .iter()
        .find(|c| c.rtype == nbd::REPLY_TYPE_BLOCK_STATUS)
        .unwrap_or_else(|| panic!("no block status chunk: {chunks:?}"));
    let d: Vec<(u32, u32)> = bs.payload[4..]
        .chunks(8)
        .map(|x| (be32(x), be32(&x[4..])))
        .collect();
    assert_eq!(d[0], (sh, 0), "{}: the shadow is data: {d:?}", t.export);
    assert!(
        d.len() > 1 && d[1].1 & 1 == 1,
        "trimmed block after it: {d:?}"
    );
    // The guest's table again, as a guest would leave it.
    let r = s.write(0, &table);
    s.expect("rewrite the guest's table", 0, r);
    s.disconnect();
}

fn run_all(t: &Target, others: &[&str]) {
    check_bounds(t);
    check_zero_lengths(t);
    check_unknown_commands_and_flags(t);
    check_structured(t);
    check_pipelined(t);
    check_options(t, others);
    check_garbage(t);
    check_absurd_lengths(t);
}

/// A lungate target for each of `exports` (name, size), over TCP and the
/// unix socket in turn.
fn targets(gw: &Gateway, exports: &[(String, u64)]) -> Vec<Target> {
    exports
        .iter()
        .enumerate()
        .map(|(i, (export, size))| Target {
            addr: if i % 2 == 0 {
                Addr::Tcp(gw.addr())
            } else {
                Addr::Unix(gw.unix_path().to_path_buf())
            },
            export: export.clone(),
            size: *size,
            lungate: true,
            pid: gw.pid(),
        })
        .collect()
}

/// Every hostile check against each of `exports` ([`targets`]; the option
/// checks look for the others by name); `first(target)` runs before an
/// export's checks. An export past 4 GiB gets the checks that fit its size
/// ([`check_huge`]). The gateway must survive every export's checks.
fn check_exports(gw: &mut Gateway, exports: &[(String, u64)], mut first: impl FnMut(&Target)) {
    let names: Vec<&str> = exports.iter().map(|(n, _)| n.as_str()).collect();
    for t in targets(gw, exports) {
        first(&t);
        if t.size > 1 << 32 {
            check_huge(&t);
        } else {
            run_all(&t, &names);
        }
        gw.assert_running();
    }
}

#[test]
fn hostile_requests_never_escape_the_disk_region() {
    require_tool("qemu-io");
    let mut pool = Pool::all_layouts();
    pool.add("huge", "truncate", &["5G", "5G"], "16M");
    // A short handshake deadline: a server may end a handshake that claims
    // a 4 GiB option by that deadline instead of at once (see
    // check_absurd_lengths); every honest handshake here takes milliseconds.
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!("pools = [\"{}\"]\nhandshake_timeout = 3\n", pool.arg()),
    )
    .expect("write config");
    let mut gw = Gateway::start(&["--config", config.to_str().expect("utf-8")]);
    let exports = pool.exports();
    let shadows: Vec<(String, u64)> = pool
        .luns
        .iter()
        .flat_map(|l| (0..l.disk_sizes.len()).map(move |i| (l.export(i), l.shadowed(i))))
        .filter(|(_, s)| *s > 0)
        .collect();
    assert!(!shadows.is_empty(), "the pool has an aligned LUN");
    check_exports(&mut gw, &exports, |t| {
        if let Some((_, shadow)) = shadows.iter().find(|(e, _)| *e == t.export) {
            check_shadow(t, *shadow);
            pool.assert_hidden_unchanged();
        }
    });
    // The last block written through NBD sits at the end of the region in
    // the backing file: the view maps offsets, it does not shift them.
    for l in &pool.luns {
        for (i, (offset, length)) in disk_regions(&l.path).into_iter().enumerate() {
            assert_eq!(length, l.disk_sizes[i], "{} disk{i} region length", l.name);
            let want = pattern_bytes(4096, length ^ 0x1a57);
            assert_eq!(
                file_bytes(&l.path, offset + length - 4096, 4096),
                want,
                "{} disk{i}: last block not at region end in the file",
                l.name
            );
        }
    }
    // A well-behaved client is still served.
    for (export, _) in &exports {
        qemu_io_ok(
            &gw.uri(export),
            &["write -P 0x3c 0 64k", "read -P 0x3c 0 64k"],
        );
    }
    gw.assert_running();
    gw.stop_ok();
    pool.assert_hidden_unchanged();
}

#[test]
fn read_only_gateway_refuses_every_write() {
    let pool = Pool::all_layouts();
    // Put known data in first, through a writable gateway.
    let gw = Gateway::start(&["--pool", pool.arg()]);
    for (export, _) in pool.exports() {
        qemu_io_ok(&gw.uri(&export), &["write -P 0x77 0 8k"]);
    }
    gw.stop_ok();
    let digests: Vec<_> = pool
        .luns
        .iter()
        .map(|l| std::fs::read(&l.path).map(|b| blake3::hash(&b)))
        .collect();

    let gw = Gateway::start(&["--pool", pool.arg(), "--read-only"]);
    for t in targets(&gw, &pool.exports()) {
        check_read_only(&t);
    }
    gw.stop_ok();
    let after: Vec<_> = pool
        .luns
        .iter()
        .map(|l| std::fs::read(&l.path).map(|b| blake3::hash(&b)))
        .collect();
    for (i, l) in pool.luns.iter().enumerate() {
        assert_eq!(
            digests[i].as_ref().ok(),
            after[i].as_ref().ok(),
            "{}: a read-only gateway changed the file",
            l.path.display()
        );
        hidden_digest(&l.path);
    }
    pool.assert_hidden_unchanged();
}

/// nbdkit serving a plain file: a running reference server.
struct Nbdkit {
    child: Child,
    sock: PathBuf,
    _dir: tempfile::TempDir,
}

impl Nbdkit {
    fn start(read_only: bool) -> (Nbdkit, PathBuf) {
        let nbdkit = require_tool("nbdkit");
        let dir = tempfile::Builder::new()
            .prefix("lungate-ref-")
            .tempdir()
            .expect("tempdir");
        let exp = dir.path().join("exp");
        std::fs::create_dir(&exp).expect("mkdir");
        let img = exp.join("disk.img");
        std::fs::File::create(&img)
            .and_then(|f| f.set_len(64 * MIB))
            .expect("create image");
        let sock = dir.path().join("nbdkit.sock");
        let mut cmd = Command::new(nbdkit);
        cmd.args(["-f", "--exit-with-parent", "-U"]).arg(&sock);
        if read_only {
            cmd.arg("-r");
        }
        cmd.arg("file")
            .arg(format!("dir={}", exp.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd.spawn().expect("start nbdkit");
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&sock).is_err() {
            assert!(Instant::now() < deadline, "nbdkit did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        (
            Nbdkit {
                child,
                sock,
                _dir: dir,
            },
            img,
        )
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = wait_timeout(&mut self.child, Duration::from_secs(10));
    }
}

#[test]
fn reference_nbdkit_agrees_with_these_expectations() {
    let (kit, _img) = Nbdkit::start(false);
    let t = Target {
        addr: Addr::Unix(kit.sock.clone()),
        export: "disk.img".into(),
        size: 64 * MIB,
        lungate: false,
        pid: kit.child.id(),
    };
    run_all(&t, &[]);
    drop(kit);
    let (kit, _img) = Nbdkit::start(true);
    let t = Target {
        addr: Addr::Unix(kit.sock.clone()),
        export: "disk.img".into(),
        size: 64 * MIB,
        lungate: false,
        pid: kit.child.id(),
    };
    check_read_only(&t);
}

/// FORCEDTLS (`--tls require`): before STARTTLS every option but ABORT gets
/// ERR_TLS_REQD, EXPORT_NAME ends the session, STARTTLS with data is an
/// error, and a client that says STARTTLS and then sends garbage (or
/// nothing) instead of a TLS handshake is dropped without harm.
fn check_forced_tls(addr: &Addr, export: &str) {
    let mut r = Raw::start(addr);
    let go = Raw::go_data(export.as_bytes());
    for (opt, data) in [
        (nbd::OPT_LIST, &[][..]),
        (nbd::OPT_INFO, &go[..]),
        (nbd::OPT_GO, &go[..]),
        (nbd::OPT_STRUCTURED_REPLY, &[][..]),
        (0x7777, &[][..]),
        (0x7777, &b"some data"[..]),
    ] {
        assert_eq!(
            rep_name(r.opt_final(opt, data)),
            "ERR_TLS_REQD",
            "option {opt:#x} before STARTTLS"
        );
    }
    let st = r.opt_final(nbd::OPT_STARTTLS, b"junk");
    assert!(st & (1 << 31) != 0, "STARTTLS with data: {}", rep_name(st));
    r.send_opt(nbd::OPT_ABORT, &[]);
    match r.try_opt_reply() {
        Ok(x) => assert_eq!(rep_name(x.rtype), "ACK", "ABORT before TLS"),
        Err(e) => panic!("ABORT before TLS: no ACK ({e})"),
    }

    let mut r = Raw::start(addr);
    r.send_opt(nbd::OPT_EXPORT_NAME, export.as_bytes());
    assert!(
        r.closes(),
        "EXPORT_NAME before STARTTLS did not end the session"
    );

    for garbage in [
        &b""[..],
        &[0x16, 0x03, 0x01, 0xff, 0xff][..],
        &[0u8; 600][..],
    ] {
        let mut r = Raw::start(addr);
        assert_eq!(
            rep_name(r.opt_final(nbd::OPT_STARTTLS, &[])),
            "ACK",
            "STARTTLS"
        );
        if garbage.is_empty() {
            continue; // the client just leaves
        }
        let _ = r.try_send(garbage);
        if garbage.len() > 5 {
            // A TLS alert may come first; then the connection must end.
            let said = r.closes_after(64);
            if let Some(&t) = said.first() {
                assert_eq!(t, 0x15, "only a TLS alert may answer garbage: {said:02x?}");
            }
        }
    }
}

#[test]
fn forced_tls_refuses_everything_before_starttls() {
    let certs = TlsCerts::generate();
    let pool = Pool::all_layouts();
    let mut args = vec!["--pool".to_string(), pool.arg().to_string()];
    args.extend(["--tls".into(), "require".into()]);
    args.extend(certs.server_args());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut gw = Gateway::start(&args);
    for (i, (export, _)) in pool.exports().into_iter().enumerate() {
        let addr = if i % 2 == 0 {
            Addr::Tcp(gw.addr())
        } else {
            Addr::Unix(gw.unix_path().to_path_buf())
        };
        check_forced_tls(&addr, &export);
        gw.assert_running();
    }
    // A real TLS client is still served.
    let export = pool.exports()[0].0.clone();
    run_ok(Command::new(require_tool("nbdinfo")).arg(format!(
        "nbds://127.0.0.1:{}/{export}?tls-certificates={}",
        gw.port(),
        certs.dir().display()
    )));
    gw.stop_ok();
    pool.assert_hidden_unchanged();

    // The same expectations hold for nbdkit in FORCEDTLS mode.
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(MIB))
        .expect("image");
    let sock = dir.path().join("kit.sock");
    let mut kit = Command::new(require_tool("nbdkit"))
        .args(["-f", "--exit-with-parent", "--tls=require"])
        .arg(format!("--tls-certificates={}", certs.dir().display()))
        .arg("-U")
        .arg(&sock)
        .arg("file")
        .arg(&img)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nbdkit");
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(&sock).is_err() {
        assert!(Instant::now() < deadline, "nbdkit did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    check_forced_tls(&Addr::Unix(sock), "");
    let _ = kit.kill();
    let _ = wait_timeout(&mut kit, Duration::from_secs(10));
}

/// `handshake_timeout`: a client that connects and says nothing, or one
/// that trickles options forever, is dropped once the timeout passes,
/// while a normal client connecting meanwhile is served.
#[test]
fn slow_handshakes_are_cut_off() {
    let pool = Pool::all_layouts();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!("pools = [\"{}\"]\nhandshake_timeout = 2\n", pool.arg()),
    )
    .expect("write config");
    let mut gw = Gateway::start(&["--config", config.to_str().expect("utf-8")]);
    let tcp = Addr::Tcp(gw.addr());
    let unix = Addr::Unix(gw.unix_path().to_path_buf());
    let export = pool.exports()[0].0.clone();

    let t0 = Instant::now();
    let mut silent = Raw::connect(&tcp);
    let mut silent_unix = Raw::connect(&unix);
    let mut flags_only = Raw::start(&tcp);
    // A trickler: one unknown option every 300 ms.
    let mut trickle = Raw::start(&unix);
    let mut answered = 0;
    loop {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "trickler never cut off"
        );
        let mut b = nbd::IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&0x4242u32.to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes());
        if trickle.try_send(&b).is_err() {
            break;
        }
        match trickle.try_opt_reply() {
            Ok(x) => {
                assert_eq!(rep_name(x.rtype), "ERR_UNSUP");
                answered += 1;
            }
            Err(_) => break,
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let cut = t0.elapsed();
    assert!(
        answered >= 3,
        "the trickler was cut off too early ({answered} options)"
    );
    assert!(
        cut >= Duration::from_millis(1500) && cut < Duration::from_secs(10),
        "trickler cut off after {cut:?}, want about 2 s"
    );
    // Meanwhile a prompt client is served.
    let mut s = Session::simple(&tcp, &export);
    s.assert_usable("slow handshakes elsewhere");
    for (r, what) in [
        (&mut silent, "silent TCP client"),
        (&mut silent_unix, "silent unix client"),
        (&mut flags_only, "client stuck after its flags"),
    ] {
        assert!(r.closes(), "{what} not dropped");
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{what} dropped late"
        );
    }
    // The transmission phase has no such timeout: an idle session lives on.
    std::thread::sleep(Duration::from_millis(2500));
    s.assert_usable("an idle transmission phase longer than handshake_timeout");
    s.disconnect();
    gw.assert_running();
    gw.stop_ok();
    pool.assert_hidden_unchanged();
}

/// A client that pipelines gigabytes of READs and never reads a reply, and
/// a hundred idle connections: the gateway's memory stays bounded (it stops
/// reading from a client whose replies pile up) and an honest client on
/// another connection is served throughout.
#[test]
fn clients_that_never_read_replies_cannot_exhaust_memory() {
    let pool = Pool::all_layouts();
    let mut gw = Gateway::start(&["--pool", pool.arg()]);
    let (export, size) = pool.exports()[0].clone();
    let tcp = Addr::Tcp(gw.addr());
    let mut honest = Session::simple(&tcp, &export);
    let data = pattern_bytes(MIB as usize, 0x5eed);
    let r = honest.write(0, &data);
    honest.expect("seed", 0, r);
    let rss0 = rss_kib(gw.pid());

    // 2 connections x 256 reads of 16 MiB: 8 GiB of replies nobody reads.
    let mut hogs = Vec::new();
    for _ in 0..2 {
        let mut s = Session::simple(&tcp, &export);
        let mut frames = Vec::new();
        for i in 0..256u64 {
            let off = (i * 16 * MIB) % (size - 16 * MIB);
            frames.extend_from_slice(&Session::header(0, nbd::CMD_READ, i, off, 16 << 20));
        }
        s.raw.send(&frames);
        hogs.push(s);
    }
    let mut peak = 0;
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        peak = peak.max(rss_kib(gw.pid()));
        std::thread::sleep(Duration::from_millis(100));
    }
    match honest.read(0, MIB as u32) {
        Reply::Ok(d) => assert!(d == data, "honest read returned wrong data"),
        e => panic!("honest client not served while others hog: {e:?}"),
    }
    eprintln!("gateway RSS {rss0} KiB, peak {peak} KiB with unread replies queued");
    assert!(
        peak < rss0 + 400 * 1024,
        "gateway RSS went from {rss0} KiB to {peak} KiB with 8 GiB of unread replies queued"
    );

    // A hundred idle connections in transmission.
    let idle: Vec<Session> = (0..100)
        .map(|i| {
            if i % 2 == 0 {
                Session::simple(&tcp, &export)
            } else {
                Session::simple(&Addr::Unix(gw.unix_path().to_path_buf()), &export)
            }
        })
        .collect();
    honest.assert_usable("100 idle connections");
    drop(hogs);
    drop(idle);
    honest.assert_usable("hogs gone");
    honest.disconnect();
    gw.assert_running();
    gw.stop_ok();
    pool.assert_hidden_unchanged();
}

/// A config file (in a temp dir kept with the returned guard) holding
/// `toml`, as `--config PATH` arguments.
fn config_file(toml: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("gateway.toml");
    std::fs::write(&p, toml).expect("write config");
    let s = p.to_str().expect("utf-8").to_string();
    (dir, s)
}

/// The reproduction of issue 7's finding 4: forty clients connect, each
/// pipelines 256 READs of 1 MiB and never reads a reply (10 GiB asked
/// for). Before the gateway-wide bound each pinned its 64 MiB
/// `max_in_flight` and RSS reached 1.9 GB, and stayed there after they
/// left. Now the gateway's RSS (from /proc of the PID this test started)
/// stays under `max_memory` (512 MiB) above where it started, a client
/// connected before them and one connecting in the middle of it are both
/// served correct data throughout, and once the forty leave the memory is
/// given back.
#[test]
fn forty_clients_that_never_read_replies_stay_inside_max_memory() {
    let mut pool = Pool::new();
    pool.add("mem", "offset", &["64M"], "16M");
    let (_cfg, cfg) = config_file("max_memory = \"512M\"\nmax_connections_per_client = 100\n");
    let mut gw = Gateway::start(&["--config", &cfg, "--pool", pool.arg()]);
    let (export, size) = pool.exports()[0].clone();
    let tcp = Addr::Tcp(gw.addr());
    let mut honest = Session::simple(&tcp, &export);
    let data = pattern_bytes(MIB as usize, 0x4040);
    let r = honest.write(0, &data);
    honest.expect("seed", 0, r);
    let rss0 = rss_kib(gw.pid());

    let mut hogs = Vec::new();
    for n in 0..40u64 {
        let mut s = Session::simple(&tcp, &export);
        let mut frames = Vec::new();
        for i in 0..256u64 {
            let off = ((n * 256 + i) * MIB) % (size - MIB);
            frames.extend_from_slice(&Session::header(0, nbd::CMD_READ, i, off, MIB as u32));
        }
        s.raw.send(&frames);
        hogs.push(s);
    }
    let mut peak = 0;
    let mut late = None;
    let deadline = Instant::now() + Duration::from_secs(4);
    while Instant::now() < deadline {
        peak = peak.max(rss_kib(gw.pid()));
        match honest.read(0, MIB as u32) {
            Reply::Ok(d) => assert!(d == data, "the honest client read wrong data"),
            e => panic!("the honest client was not served while forty others hog: {e:?}"),
        }
        let r = honest.write(8 * MIB, &data);
        honest.expect("honest write under load", 0, r);
        if late.is_none() {
            let mut s = Session::simple(&tcp, &export);
            assert_eq!(s.read_ok(0, MIB as u32), data, "a client arriving late");
            late = Some(s);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("gateway RSS {rss0} KiB before, peak {peak} KiB with 40 clients not reading");
    assert!(
        peak < rss0 + 512 * 1024,
        "gateway RSS went from {rss0} KiB to {peak} KiB, beyond max_memory = 512M"
    );

    drop(hogs);
    let mut after = rss_kib(gw.pid());
    let deadline = Instant::now() + Duration::from_secs(10);
    while after > rss0 + 64 * 1024 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        after = rss_kib(gw.pid());
    }
    eprintln!("gateway RSS {after} KiB after the forty left");
    assert!(
        after <= rss0 + 64 * 1024,
        "memory was not given back: RSS {after} KiB, {rss0} KiB before the clients came"
    );
    honest.assert_usable("the forty left");
    honest.disconnect();
    late.expect("late client").disconnect();
    gw.assert_running();
    gw.stop_ok();
    pool.assert_hidden_unchanged();
}

/// True if the server closes a fresh TCP connection without sending the
/// NBD greeting.
fn refused_at_accept(addr: SocketAddr) -> bool {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(REPLY_TIMEOUT)).expect("timeout");
    let mut b = [0u8; 18];
    match s.read(&mut b) {
        Ok(0) => true,
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => true,
        Ok(_) => false,
        Err(e) => panic!("neither greeting nor close: {e}"),
    }
}

/// `max_connections_per_client`: a client (here 127.0.0.1) gets that many
/// connections and the next is closed before the greeting; another client
/// (the unix socket's user) is not affected, and once one of the first
/// connections closes the client may connect again. `max_memory` bounds
/// the number of connections too: each reserves its floor at accept.
#[test]
fn connections_beyond_the_client_limit_or_the_memory_budget_are_refused() {
    let mut pool = Pool::new();
    pool.add("lim", "offset", &["16M"], "16M");
    let (_cfg, cfg) = config_file("max_connections_per_client = 4\n");
    let gw = Gateway::start(&["--config", &cfg, "--pool", pool.arg()]);
    let (export, _) = pool.exports()[0].clone();
    let tcp = Addr::Tcp(gw.addr());
    let mut four: Vec<Session> = (0..4).map(|_| Session::simple(&tcp, &export)).collect();
    assert!(refused_at_accept(gw.addr()), "a fifth connection got in");
    let unix = Addr::Unix(gw.unix_path().to_path_buf());
    let mut other = Session::simple(&unix, &export);
    other.assert_usable("another client at the limit of the first");
    for s in &mut four {
        s.assert_usable("connections within the limit");
    }
    four.pop().expect("one").disconnect();
    // The count drops when the session ends on the server's side.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut again = None;
    while again.is_none() && Instant::now() < deadline {
        if !refused_at_accept(gw.addr()) {
            again = Some(());
        } else {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    assert!(
        again.is_some(),
        "the client could not reconnect after closing one"
    );
    assert!(gw.stderr_log().contains("max_connections_per_client"));
    other.disconnect();
    drop(four);
    gw.stop_ok();

    // 32 MiB of budget holds fifteen connection floors of about 2 MiB.
    let (_cfg, cfg) = config_file("max_memory = \"32M\"\n");
    let mut gw = Gateway::start(&["--config", &cfg, "--pool", pool.arg()]);
    assert!(
        gw.stderr_log().contains("max_connections=15"),
        "{}",
        gw.stderr_log()
    );
    let held: Vec<Session> = (0..15)
        .map(|_| Session::simple(&tcp_of(&gw), &export))
        .collect();
    assert!(
        refused_at_accept(gw.addr()),
        "a sixteenth connection got in"
    );
    assert!(gw.stderr_log().contains("max_memory has no room"));
    drop(held);
    gw.assert_running();
    gw.stop_ok();
    pool.assert_hidden_unchanged();
}

fn tcp_of(gw: &Gateway) -> Addr {
    Addr::Tcp(gw.addr())
}

/// Issue 7's finding 6: requests up to the 64 MiB default maximum (the
/// conformance client sends 49,865,728 bytes; 32 MiB used to be refused)
/// work with simple and structured replies, while a connection whose
/// `max_in_flight` is 4 MiB never holds more than that: a 48 MiB WRITE is
/// written as it arrives, a 48 MiB READ is sent in pieces, and the
/// gateway's RSS grows by far less than one such request.
#[test]
fn requests_larger_than_max_in_flight_stream_through() {
    let mut pool = Pool::new();
    pool.add("huge", "offset", &["64M"], "16M");
    let (_cfg, cfg) = config_file("max_in_flight = \"4M\"\n");
    let mut gw = Gateway::start(&["--config", &cfg, "--pool", pool.arg()]);
    let (export, _) = pool.exports()[0].clone();
    let tcp = Addr::Tcp(gw.addr());
    let big = 48 * MIB as usize + 4096;
    let data = pattern_bytes(big, 0xb1b);
    let mut s = Session::simple(&tcp, &export);
    let rss0 = rss_kib(gw.pid());
    let r = s.write(4096, &data);
    s.expect("48 MiB write", 0, r);
    let rss_write = rss_kib(gw.pid());
    let back = s.read_ok(4096, big as u32);
    assert!(back == data, "48 MiB simple read returned other data");
    let rss_read = rss_kib(gw.pid());
    let mut st = Session::open(&tcp, &export, true, false);
    let back = st.read_ok(4096, big as u32);
    assert!(back == data, "48 MiB structured read returned other data");
    let rss_structured = rss_kib(gw.pid());
    // A 64 MiB request is the maximum; one byte more is refused.
    let r = st.read(0, 64 << 20);
    assert_eq!(r.err(), 0, "64 MiB read");
    let r = st.read(0, (64 << 20) + 1);
    st.expect("read beyond the maximum", nbd::EINVAL, r);
    eprintln!(
        "RSS {rss0} KiB; after a 48 MiB write {rss_write}, simple read {rss_read}, structured read {rss_structured}"
    );
    for (what, kib) in [
        ("write", rss_write),
        ("simple read", rss_read),
        ("structured read", rss_structured),
    ] {
        assert!(
            kib < rss0 + 24 * 1024,
            "a 48 MiB {what} grew RSS from {rss0} KiB to {kib} KiB"
        );
    }
    s.disconnect();
    st.disconnect();
    gw.assert_running();
    gw.stop_ok();
    pool.assert_hidden_unchanged();
}

/// A client that never reads the reply of a 48 MiB READ (with a small
/// overlapping WRITE queued behind it), and one that sends the header and
/// first MiB of a 48 MiB WRITE and then stalls, do not hold up a live
/// switch of their LUN: a streamed request holds the LUN's gate only while
/// one of its pieces does I/O, and a request waiting for an earlier
/// overlapping one takes its place at the gate only after it. A snapshot
/// through the control API completes promptly, and an honest client is
/// served before and after.
#[test]
fn stalled_large_requests_do_not_hold_up_a_snapshot() {
    let mut pool = Pool::new();
    pool.add("sw", "offset", &["64M"], "16M");
    let mut gw = Gateway::start(&["--pool", pool.arg()]);
    let (export, _) = pool.exports()[0].clone();
    let tcp = Addr::Tcp(gw.addr());
    let mut honest = Session::simple(&tcp, &export);
    let data = pattern_bytes(MIB as usize, 0x5a5a);
    let r = honest.write(0, &data);
    honest.expect("seed", 0, r);

    let big = 48 * MIB as u32;
    let mut reader = Session::simple(&tcp, &export);
    reader
        .raw
        .send(&Session::header(0, nbd::CMD_READ, 1, 0, big));
    // Behind it on the same connection, a small write it overlaps: it
    // waits for the read (arrival order), and must not hold the gate while
    // it waits.
    let mut w = Session::header(0, nbd::CMD_WRITE, 2, 4096, 4096).to_vec();
    w.extend_from_slice(&[0xee; 4096]);
    reader.raw.send(&w);
    let mut writer = Session::simple(&tcp, &export);
    let mut b = Session::header(0, nbd::CMD_WRITE, 1, 8 * MIB, big).to_vec();
    b.extend_from_slice(&pattern_bytes(MIB as usize, 7));
    writer.raw.send(&b);
    std::thread::sleep(Duration::from_millis(500));

    let started = Instant::now();
    let v = lungate_tests::api(
        &gw.control(),
        "POST",
        "/v1/luns/sw/snapshots",
        Some(serde_json::json!({ "name": "under-stall" })),
        201,
    );
    let took = started.elapsed();
    eprintln!("snapshot with two stalled clients: {took:?}, {v}");
    assert!(
        took < Duration::from_secs(10),
        "the snapshot waited {took:?} behind stalled requests"
    );
    assert_eq!(
        honest.read_ok(0, MIB as u32),
        data,
        "honest read after the snapshot"
    );
    let r = honest.write(4 * MIB, &data);
    honest.expect("honest write after the snapshot", 0, r);
    drop(reader);
    drop(writer);
    honest.assert_usable("stalled clients gone");
    honest.disconnect();
    gw.assert_running();
    gw.stop_ok();
}

/// The same hostile client against LUNs on Ceph RBD (`--features rbd`; run
/// by scripts/test's rbd step): the region view and the checks are the
/// store's business only below the volume, so an image must hold up
/// exactly as a file does — nothing reaches the label or the hidden state
/// region, and the last block written lands at its region's end in the
/// image.
#[cfg(feature = "rbd")]
#[test]
fn rbd_hostile_requests_never_escape_the_disk_region() {
    use lungate_tests::ceph::Cluster;
    use lungate_tests::{assert_success, lunctl};
    let c = Cluster::shared();
    let ns = "hostile";
    let pool = c.pool(ns);
    let luns = [
        ("off", "offset", ["24M", "8M"]),
        ("trunc", "truncate", ["16M", "8M"]),
    ];
    for (name, layout, [d0, d1]) in luns {
        let out = lunctl(&[
            "create", "--pool", &pool, "--layout", layout, "--disk", d0, "--disk", d1, "--memory",
            "4M", name,
        ]);
        assert_success("lunctl create", &out);
    }
    // The images' bytes, as files the LUN tools of this test read.
    let before = tempfile::tempdir().expect("tempdir");
    let image = |name: &str| c.export(ns, &format!("{name}.lun"), before.path());
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!("pools = [\"{pool}\"]\nhandshake_timeout = 3\n"),
    )
    .expect("write config");
    let mut gw = Gateway::start(&["--config", config.to_str().expect("utf-8")]);
    // The gateway's start wrote its owner record; from here on nothing a
    // client sends may change a hidden byte.
    let hidden: Vec<[u8; 32]> = luns
        .iter()
        .map(|(n, ..)| hidden_digest(&image(n)))
        .collect();
    let mut exports = Vec::new();
    for (name, ..) in &luns {
        for (i, (_, length)) in disk_regions(&image(name)).into_iter().enumerate() {
            exports.push((format!("{name}/disk{i}"), length));
        }
    }
    check_exports(&mut gw, &exports, |_| {});
    for ((name, ..), was) in luns.iter().zip(&hidden) {
        let copy = c.export(ns, &format!("{name}.lun"), dir.path());
        assert_eq!(
            &hidden_digest(&copy),
            was,
            "{name}: hostile requests changed the hidden region of the image"
        );
        for (i, (offset, length)) in disk_regions(&copy).into_iter().enumerate() {
            assert_eq!(
                file_bytes(&copy, offset + length - 4096, 4096),
                pattern_bytes(4096, length ^ 0x1a57),
                "{name} disk{i}: last block not at region end in the image"
            );
        }
    }
    for (export, _) in &exports {
        qemu_io_ok(
            &gw.uri(export),
            &["write -P 0x3c 0 64k", "read -P 0x3c 0 64k"],
        );
    }
    gw.stop_ok();
}
