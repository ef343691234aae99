//! A blocking NBD client of one export: the fixed-newstyle handshake with
//! `NBD_OPT_GO`, then one request at a time with simple replies. It is
//! what `vmm-shim`'s paravirtual disk reaches a gateway's export through,
//! like any other NBD client; it needs no structured replies, no
//! metadata contexts and no TLS (it talks to a gateway on this host, over
//! a unix socket or the loopback).
//!
//! Every length is checked before it is used: a server that announces an
//! option reply longer than [`MAX_OPTION_REPLY`], a reply to a request
//! that was not sent, or a size the export does not have is an error, not
//! a hang or an allocation.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use super::proto::{
    client_flags, handshake_flags, info, opt, rep, tx_flags, Command, IHAVEOPT, NBDMAGIC,
    OPTION_REPLY_MAGIC, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC,
};

/// Largest option reply payload accepted during the handshake.
pub const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// Largest READ or WRITE sent in one request; longer ones are split.
pub const MAX_REQUEST: usize = 4 << 20;

/// Where an NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Unix(p) => write!(f, "nbd+unix://{}", p.display()),
            Address::Tcp(a) => write!(f, "nbd://{a}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{addr}: {source}")]
    Io {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr}: not an NBD server: {why}")]
    Protocol { addr: String, why: String },
    #[error("{addr}: export {export:?} refused: {message}")]
    Refused {
        addr: String,
        export: String,
        message: String,
    },
    /// The server answered a request with an NBD error value.
    #[error("{addr}: {what} at offset {offset}, {length} bytes: NBD error {code} ({name})")]
    Request {
        addr: String,
        what: &'static str,
        offset: u64,
        length: u64,
        code: u32,
        name: &'static str,
    },
    #[error("{addr}: {what} at offset {offset} + {length} bytes exceeds the export size {size}")]
    OutOfBounds {
        addr: String,
        what: &'static str,
        offset: u64,
        length: u64,
        size: u64,
    },
    #[error("{addr}: the export is read-only")]
    ReadOnly { addr: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

enum Sock {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Read for Sock {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Sock::Unix(s) => s.read(b),
            Sock::Tcp(s) => s.read(b),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        match self {
            Sock::Unix(s) => s.write(b),
            Sock::Tcp(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Sock::Unix(s) => s.flush(),
            Sock::Tcp(s) => s.flush(),
        }
    }
}

/// One connection to one export, in the transmission phase.
pub struct NbdClient {
    sock: Sock,
    addr: String,
    export: String,
    size: u64,
    flags: u16,
    next_handle: u64,
}

fn error_name(code: u32) -> &'static str {
    match code {
        1 => "EPERM",
        5 => "EIO",
        12 => "ENOMEM",
        22 => "EINVAL",
        28 => "ENOSPC",
        75 => "EOVERFLOW",
        95 => "ENOTSUP",
        108 => "ESHUTDOWN",
        _ => "unknown",
    }
}

impl NbdClient {
    /// Connect to `addr` and select `export` with NBD_OPT_GO.
    pub fn connect(addr: &Address, export: &str) -> Result<NbdClient> {
        let a = addr.to_string();
        let io = |source| Error::Io {
            addr: a.clone(),
            source,
        };
        let sock = match addr {
            Address::Unix(p) => Sock::Unix(UnixStream::connect(p).map_err(io)?),
            Address::Tcp(t) => {
                let s = TcpStream::connect(t).map_err(io)?;
                s.set_nodelay(true).map_err(io)?;
                Sock::Tcp(s)
            }
        };
        let mut c = NbdClient {
            sock,
            addr: a,
            export: export.to_string(),
            size: 0,
            flags: 0,
            next_handle: 1,
        };
        c.handshake()?;
        Ok(c)
    }

    fn proto(&self, why: impl Into<String>) -> Error {
        Error::Protocol {
            addr: self.addr.clone(),
            why: why.into(),
        }
    }

    fn read_exact(&mut self, b: &mut [u8]) -> Result<()> {
        self.sock.read_exact(b).map_err(|e| Error::Io {
            addr: self.addr.clone(),
            source: e,
        })
    }

    fn write_all(&mut self, b: &[u8]) -> Result<()> {
        self.sock.write_all(b).map_err(|e| Error::Io {
            addr: self.addr.clone(),
            source: e,
        })
    }

    fn handshake(&mut self) -> Result<()> {
        let mut h = [0u8; 18];
        self.read_exact(&mut h)?;
        let magic = u64::from_be_bytes(h[0..8].try_into().expect("8"));
        let opt_magic = u64::from_be_bytes(h[8..16].try_into().expect("8"));
        if magic != NBDMAGIC || opt_magic != IHAVEOPT {
            return Err(self.proto("no NBDMAGIC/IHAVEOPT greeting (oldstyle or another protocol)"));
        }
        let server = u16::from_be_bytes([h[16], h[17]]);
        if server & handshake_flags::FIXED_NEWSTYLE == 0 {
            return Err(self.proto("the server does not speak fixed newstyle"));
        }
        let mut cflags = client_flags::FIXED_NEWSTYLE;
        if server & handshake_flags::NO_ZEROES != 0 {
            cflags |= client_flags::NO_ZEROES;
        }
        self.write_all(&cflags.to_be_bytes())?;

        let name = self.export.as_bytes().to_vec();
        let mut data = Vec::with_capacity(6 + name.len());
        data.extend_from_slice(&(name.len() as u32).to_be_bytes());
        data.extend_from_slice(&name);
        data.extend_from_slice(&0u16.to_be_bytes());
        let mut o = Vec::with_capacity(16 + data.len());
        o.extend_from_slice(&IHAVEOPT.to_be_bytes());
        o.extend_from_slice(&opt::GO.to_be_bytes());
        o.extend_from_slice(&(data.len() as u32).to_be_bytes());
        o.extend_from_slice(&data);
        self.write_all(&o)?;

        let mut got_export = false;
        loop {
            let mut r = [0u8; 20];
            self.read_exact(&mut r)?;
            let magic = u64::from_be_bytes(r[0..8].try_into().expect("8"));
            let option = u32::from_be_bytes(r[8..12].try_into().expect("4"));
            let kind = u32::from_be_bytes(r[12..16].try_into().expect("4"));
            let len = u32::from_be_bytes(r[16..20].try_into().expect("4"));
            if magic != OPTION_REPLY_MAGIC || option != opt::GO {
                return Err(self.proto(format!(
                    "bad option reply (magic {magic:#x}, option {option})"
                )));
            }
            if len > MAX_OPTION_REPLY {
                return Err(self.proto(format!(
                    "option reply of {len} bytes exceeds {MAX_OPTION_REPLY}"
                )));
            }
            let mut payload = vec![0u8; len as usize];
            self.read_exact(&mut payload)?;
            match kind {
                rep::ACK => break,
                rep::INFO
                    if payload.len() >= 2
                        && u16::from_be_bytes([payload[0], payload[1]]) == info::EXPORT =>
                {
                    if payload.len() != 12 {
                        return Err(self.proto("NBD_INFO_EXPORT is not 12 bytes"));
                    }
                    self.size = u64::from_be_bytes(payload[2..10].try_into().expect("8"));
                    self.flags = u16::from_be_bytes([payload[10], payload[11]]);
                    got_export = true;
                }
                k if k & (1 << 31) != 0 => {
                    return Err(Error::Refused {
                        addr: self.addr.clone(),
                        export: self.export.clone(),
                        message: String::from_utf8_lossy(&payload).into_owned(),
                    });
                }
                _ => {}
            }
        }
        if !got_export {
            return Err(self.proto("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT"));
        }
        Ok(())
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn read_only(&self) -> bool {
        self.flags & tx_flags::READ_ONLY != 0
    }

    pub fn can_flush(&self) -> bool {
        self.flags & tx_flags::SEND_FLUSH != 0
    }

    fn check(&self, what: &'static str, offset: u64, length: u64) -> Result<()> {
        if offset.checked_add(length).is_none_or(|e| e > self.size) {
            return Err(Error::OutOfBounds {
                addr: self.addr.clone(),
                what,
                offset,
                length,
                size: self.size,
            });
        }
        Ok(())
    }

    /// Send one request and read its simple reply's header.
    fn request(
        &mut self,
        what: &'static str,
        cmd: Command,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> Result<()> {
        let handle = self.next_handle;
        self.next_handle += 1;
        let mut h = [0u8; 28];
        h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h[6..8].copy_from_slice(&cmd.to_wire().to_be_bytes());
        h[8..16].copy_from_slice(&handle.to_be_bytes());
        h[16..24].copy_from_slice(&offset.to_be_bytes());
        h[24..28].copy_from_slice(&length.to_be_bytes());
        self.write_all(&h)?;
        if !payload.is_empty() {
            self.write_all(payload)?;
        }
        let mut r = [0u8; 16];
        self.read_exact(&mut r)?;
        let magic = u32::from_be_bytes(r[0..4].try_into().expect("4"));
        let err = u32::from_be_bytes(r[4..8].try_into().expect("4"));
        let got = u64::from_be_bytes(r[8..16].try_into().expect("8"));
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(self.proto(format!("reply magic {magic:#x} is not a simple reply")));
        }
        if got != handle {
            return Err(self.proto(format!("reply for handle {got}, expected {handle}")));
        }
        if err != 0 {
            return Err(Error::Request {
                addr: self.addr.clone(),
                what,
                offset,
                length: u64::from(length),
                code: err,
                name: error_name(err),
            });
        }
        Ok(())
    }

    /// Read `buf.len()` bytes at `offset`.
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check("read", offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let n = (buf.len() - done).min(MAX_REQUEST);
            let at = offset + done as u64;
            self.request("read", Command::Read, at, n as u32, &[])?;
            let piece = &mut buf[done..done + n];
            self.sock.read_exact(piece).map_err(|e| Error::Io {
                addr: self.addr.clone(),
                source: e,
            })?;
            done += n;
        }
        Ok(())
    }

    /// Write `buf` at `offset` (durable after [`NbdClient::flush`]).
    pub fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<()> {
        if self.read_only() {
            return Err(Error::ReadOnly {
                addr: self.addr.clone(),
            });
        }
        self.check("write", offset, buf.len() as u64)?;
        for (i, piece) in buf.chunks(MAX_REQUEST).enumerate() {
            let at = offset + (i * MAX_REQUEST) as u64;
            self.request("write", Command::Write, at, piece.len() as u32, piece)?;
        }
        Ok(())
    }

    /// Make every completed write durable.
    pub fn flush(&mut self) -> Result<()> {
        if !self.can_flush() {
            return Ok(());
        }
        self.request("flush", Command::Flush, 0, 0, &[])
    }

    /// End the session politely (NBD_CMD_DISC has no reply).
    pub fn disconnect(mut self) -> Result<()> {
        let mut h = [0u8; 28];
        h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h[6..8].copy_from_slice(&Command::Disc.to_wire().to_be_bytes());
        self.write_all(&h)
    }
}

impl std::fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdClient")
            .field("addr", &self.addr)
            .field("export", &self.export)
            .field("size", &self.size)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A tiny fixed-newstyle server of one 1 MiB in-memory export named
    /// "d", simple replies only; enough to prove the client's framing.
    fn serve(l: UnixListener, refuse: bool) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut disk = vec![0u8; 1 << 20];
            s.write_all(&NBDMAGIC.to_be_bytes()).unwrap();
            s.write_all(&IHAVEOPT.to_be_bytes()).unwrap();
            s.write_all(
                &(handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES).to_be_bytes(),
            )
            .unwrap();
            let mut cf = [0u8; 4];
            s.read_exact(&mut cf).unwrap();
            let mut oh = [0u8; 16];
            s.read_exact(&mut oh).unwrap();
            let len = u32::from_be_bytes(oh[12..16].try_into().unwrap());
            let mut data = vec![0u8; len as usize];
            s.read_exact(&mut data).unwrap();
            let reply = |s: &mut UnixStream, kind: u32, p: &[u8]| {
                s.write_all(&OPTION_REPLY_MAGIC.to_be_bytes()).unwrap();
                s.write_all(&opt::GO.to_be_bytes()).unwrap();
                s.write_all(&kind.to_be_bytes()).unwrap();
                s.write_all(&(p.len() as u32).to_be_bytes()).unwrap();
                s.write_all(p).unwrap();
            };
            if refuse {
                reply(&mut s, rep::ERR_UNKNOWN, b"no export named \"x\"");
                return disk;
            }
            let mut i = Vec::new();
            i.extend_from_slice(&info::EXPORT.to_be_bytes());
            i.extend_from_slice(&(disk.len() as u64).to_be_bytes());
            i.extend_from_slice(&(tx_flags::HAS_FLAGS | tx_flags::SEND_FLUSH).to_be_bytes());
            reply(&mut s, rep::INFO, &i);
            reply(&mut s, rep::ACK, &[]);
            loop {
                let mut h = [0u8; 28];
                if s.read_exact(&mut h).is_err() {
                    return disk;
                }
                let cmd = u16::from_be_bytes([h[6], h[7]]);
                let handle = &h[8..16];
                let off = u64::from_be_bytes(h[16..24].try_into().unwrap()) as usize;
                let len = u32::from_be_bytes(h[24..28].try_into().unwrap()) as usize;
                let mut r = Vec::new();
                r.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
                match Command::from_wire(cmd) {
                    Command::Disc => return disk,
                    Command::Write => {
                        s.read_exact(&mut disk[off..off + len]).unwrap();
                        r.extend_from_slice(&0u32.to_be_bytes());
                        r.extend_from_slice(handle);
                    }
                    Command::Read => {
                        r.extend_from_slice(&0u32.to_be_bytes());
                        r.extend_from_slice(handle);
                        r.extend_from_slice(&disk[off..off + len]);
                    }
                    _ => {
                        r.extend_from_slice(&5u32.to_be_bytes());
                        r.extend_from_slice(handle);
                    }
                }
                s.write_all(&r).unwrap();
            }
        })
    }

    #[test]
    fn writes_read_back_and_errors_name_what_failed() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("nbd.sock");
        let t = serve(UnixListener::bind(&p).unwrap(), false);
        let mut c = NbdClient::connect(&Address::Unix(p.clone()), "d").unwrap();
        assert_eq!(c.size(), 1 << 20);
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        c.write_at(4096, &data).unwrap();
        let mut back = vec![0u8; data.len()];
        c.read_at(4096, &mut back).unwrap();
        assert_eq!(back, data);
        // The test server fails FLUSH with EIO: a typed error naming it.
        let e = c.flush().unwrap_err();
        assert!(
            e.to_string().contains("flush") && e.to_string().contains("EIO"),
            "{e}"
        );
        let e = c.read_at((1 << 20) - 10, &mut [0u8; 11]).unwrap_err();
        assert!(
            e.to_string().contains("exceeds the export size 1048576"),
            "{e}"
        );
        c.disconnect().unwrap();
        let disk = t.join().unwrap();
        assert_eq!(&disk[4096..4096 + data.len()], &data[..]);
    }

    #[test]
    fn a_refused_export_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("nbd.sock");
        let t = serve(UnixListener::bind(&p).unwrap(), true);
        let e = NbdClient::connect(&Address::Unix(p), "x").unwrap_err();
        assert!(e.to_string().contains("no export named"), "{e}");
        t.join().unwrap();
    }
}
