//! Listeners and connection lifecycle: bind TCP and unix sockets (or take
//! the ones systemd-style socket activation passed in), admit each
//! connection (per-client limit, memory floor), run its handshake then
//! transmission, and on shutdown stop accepting, let every session drain
//! its in-flight requests, and flush every backing file.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lungate_config::{Peer, TlsMode};
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::memory::MemoryBudget;
use crate::nbd::handshake::{negotiate, HandshakeCtx, Outcome};
use crate::nbd::session::{self, End};
use crate::nbd::transport::Transport;
use crate::registry::Registry;

/// How long shutdown waits for sessions to finish their in-flight requests.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on tcp {addr}: {source}")]
    BindTcp {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Control(#[from] crate::control::ControlError),
    #[error("cannot listen on unix socket {path}: {source}")]
    BindUnix {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("socket-activation file descriptor {fd}: {reason}")]
    Activated { fd: i32, reason: String },
}

/// Settings the server needs beyond the exports.
pub struct ServerSettings {
    pub listen: Vec<SocketAddr>,
    pub unix: Option<PathBuf>,
    pub tls_mode: TlsMode,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Per-connection bound on bytes of requests being served.
    pub max_in_flight: u64,
    /// The gateway-wide memory budget every connection draws from.
    pub memory: Arc<MemoryBudget>,
    pub max_connections_per_client: u32,
    pub handshake_timeout: Duration,
    /// Control API unix socket.
    pub control_unix: Option<PathBuf>,
    /// Control API TCP address and its token file.
    pub control_tcp: Option<(SocketAddr, PathBuf)>,
    /// TLS for the control API's TCP listener.
    pub control_tls: Option<Arc<rustls::ServerConfig>>,
    /// Where incoming migrations connect (`--migration-listen`).
    pub migration_listen: Option<SocketAddr>,
    /// Listening sockets passed in by socket activation (`LISTEN_FDS`);
    /// when there are any, `listen` and `unix` are not bound.
    pub activated: Vec<OwnedFd>,
}

/// A bound listener, as printed on stdout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listening {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::fmt::Display for Listening {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listening::Tcp(a) => write!(f, "listening tcp {a}"),
            Listening::Unix(p) => write!(f, "listening unix {}", p.display()),
        }
    }
}

struct Shared {
    hs: HandshakeCtx,
    registry: Arc<Registry>,
    max_in_flight: u64,
    memory: Arc<MemoryBudget>,
    admission: Admission,
    handshake_timeout: Duration,
}

/// Who a connection counts against for `max_connections_per_client`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ClientKey {
    Ip(IpAddr),
    /// A unix-socket peer, by user id.
    Uid(u32),
    /// A unix-socket peer whose credentials could not be read.
    UnknownUnix,
}

impl std::fmt::Display for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientKey::Ip(ip) => write!(f, "{ip}"),
            ClientKey::Uid(u) => write!(f, "unix uid {u}"),
            ClientKey::UnknownUnix => f.write_str("unix peer"),
        }
    }
}

/// Open connections per client.
#[derive(Debug)]
struct Admission {
    per_client: u32,
    open: Mutex<HashMap<ClientKey, u32>>,
}

/// One admitted connection; counted until dropped.
struct Admitted<'a> {
    admission: &'a Admission,
    key: ClientKey,
}

impl Admission {
    fn admit(&self, key: ClientKey) -> Result<Admitted<'_>, u32> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(key).or_insert(0);
        if *n >= self.per_client {
            return Err(*n);
        }
        *n += 1;
        Ok(Admitted {
            admission: self,
            key,
        })
    }
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        let mut open = self
            .admission
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

pub struct Server {
    control: crate::control::Control,
    migration: Option<TcpListener>,
    tcp: Vec<TcpListener>,
    unix: Option<(UnixListener, Option<PathBuf>)>,
    shared: Arc<Shared>,
}

/// A listener passed in by socket activation, by its address family.
enum Activated {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

/// Tell a passed-in listening socket's kind from its address family.
fn activated(fd: OwnedFd) -> Result<Activated, ServerError> {
    use std::os::fd::AsRawFd;
    let raw = fd.as_raw_fd();
    let bad = |reason: String| ServerError::Activated { fd: raw, reason };
    // SAFETY: sockaddr_storage is plain old data, valid when zeroed.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: getsockname writes at most `len` bytes into `addr`, which we
    // own and sized; `raw` is a descriptor `fd` owns.
    let rc = unsafe {
        libc::getsockname(
            raw,
            std::ptr::addr_of_mut!(addr).cast::<libc::sockaddr>(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(bad(format!(
            "not a socket: {}",
            std::io::Error::last_os_error()
        )));
    }
    let l = match i32::from(addr.ss_family) {
        libc::AF_INET | libc::AF_INET6 => {
            let l = std::net::TcpListener::from(fd);
            l.set_nonblocking(true).map_err(|e| bad(e.to_string()))?;
            Activated::Tcp(l)
        }
        libc::AF_UNIX => {
            let l = std::os::unix::net::UnixListener::from(fd);
            l.set_nonblocking(true).map_err(|e| bad(e.to_string()))?;
            Activated::Unix(l)
        }
        other => return Err(bad(format!("address family {other} is not TCP or unix"))),
    };
    Ok(l)
}

impl Server {
    /// Bind every listener; nothing is accepted until [`Server::run`].
    pub async fn bind(
        settings: ServerSettings,
        registry: Arc<Registry>,
    ) -> Result<Server, ServerError> {
        let mut tcp = Vec::new();
        let mut unix = None;
        let activation = !settings.activated.is_empty();
        for fd in settings.activated {
            use std::os::fd::AsRawFd;
            let raw = fd.as_raw_fd();
            match activated(fd)? {
                Activated::Tcp(l) => {
                    tcp.push(
                        TcpListener::from_std(l).map_err(|e| ServerError::Activated {
                            fd: raw,
                            reason: e.to_string(),
                        })?,
                    )
                }
                Activated::Unix(l) => {
                    if unix.is_some() {
                        return Err(ServerError::Activated {
                            fd: raw,
                            reason: "more than one unix socket passed in".into(),
                        });
                    }
                    let l = UnixListener::from_std(l).map_err(|e| ServerError::Activated {
                        fd: raw,
                        reason: e.to_string(),
                    })?;
                    // Not ours to remove at exit: the launcher made it.
                    unix = Some((l, None));
                }
            }
        }
        if activation {
            tracing::info!(
                tcp = tcp.len(),
                unix = unix.is_some(),
                "socket activation: serving the passed-in sockets instead of `listen` and `unix`"
            );
        }
        for addr in settings.listen.iter().filter(|_| !activation) {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::BindTcp {
                    addr: *addr,
                    source,
                })?;
            tcp.push(l);
        }
        let unix = match (&settings.unix, unix) {
            (_, Some(u)) => Some(u),
            (_, None) if activation => None,
            (None, None) => None,
            (Some(path), None) => {
                // A socket file left by a previous run would make bind fail.
                if let Ok(m) = std::fs::symlink_metadata(path) {
                    use std::os::unix::fs::FileTypeExt;
                    if m.file_type().is_socket() {
                        let _ = std::fs::remove_file(path);
                    }
                }
                let l = UnixListener::bind(path).map_err(|source| ServerError::BindUnix {
                    path: path.clone(),
                    source,
                })?;
                Some((l, Some(path.clone())))
            }
        };
        let control = crate::control::Control::bind(
            registry.clone(),
            settings.control_unix.as_deref(),
            settings
                .control_tcp
                .as_ref()
                .map(|(a, p)| (*a, p.as_path())),
            settings.control_tls,
        )
        .await?;
        let migration = match settings.migration_listen {
            None => None,
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| ServerError::BindTcp { addr, source })?,
            ),
        };
        Ok(Server {
            control,
            migration,
            tcp,
            unix,
            shared: Arc::new(Shared {
                hs: HandshakeCtx {
                    exports: registry.exports.clone(),
                    tls_mode: settings.tls_mode,
                    tls: settings.tls,
                },
                registry,
                max_in_flight: settings.max_in_flight,
                memory: settings.memory,
                admission: Admission {
                    per_client: settings.max_connections_per_client,
                    open: Mutex::new(HashMap::new()),
                },
                handshake_timeout: settings.handshake_timeout,
            }),
        })
    }

    /// The control API's and the migration listener's addresses, as
    /// printed on stdout.
    pub fn control_listening(&self) -> Vec<String> {
        let mut v = self.control.listening();
        if let Some(a) = self.migration.as_ref().and_then(|l| l.local_addr().ok()) {
            v.push(format!("migration tcp {a}"));
        }
        v
    }

    pub fn listening(&self) -> Vec<Listening> {
        let mut v: Vec<Listening> = self
            .tcp
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .map(Listening::Tcp)
            .collect();
        if let Some((l, p)) = &self.unix {
            let path = p.clone().or_else(|| {
                l.local_addr()
                    .ok()
                    .and_then(|a| a.as_pathname().map(|p| p.to_path_buf()))
            });
            if let Some(p) = path {
                v.push(Listening::Unix(p));
            }
        }
        v
    }

    /// Accept connections until `shutdown` fires, then drain sessions and
    /// flush every backing file.
    pub async fn run(self, shutdown: CancellationToken) {
        let tracker = TaskTracker::new();
        let control = tokio::spawn(self.control.run(shutdown.clone()));
        let migration = self.migration.map(|l| {
            tokio::spawn(crate::migrate::listen::run(
                l,
                self.shared.registry.clone(),
                shutdown.clone(),
            ))
        });
        let trimmer = tokio::spawn(self.shared.memory.clone().run_trimmer(shutdown.clone()));
        for l in self.tcp {
            let (shared, tracker2, stop) = (self.shared.clone(), tracker.clone(), shutdown.clone());
            tracker.spawn(async move {
                loop {
                    let accepted = tokio::select! {
                        _ = stop.cancelled() => break,
                        a = l.accept() => a,
                    };
                    match accepted {
                        Ok((sock, addr)) => {
                            let _ = sock.set_nodelay(true);
                            let ip = addr.ip().to_canonical();
                            let peer = Peer {
                                ip: Some(addr.ip()),
                                cert_names: vec![],
                            };
                            tracker2.spawn(connection(
                                Transport::Tcp(sock),
                                peer,
                                ClientKey::Ip(ip),
                                addr.to_string(),
                                shared.clone(),
                                stop.clone(),
                            ));
                        }
                        Err(e) => accept_error(e).await,
                    }
                }
            });
        }
        let unix_path = self.unix.as_ref().and_then(|(_, p)| p.clone());
        if let Some((l, _)) = self.unix {
            let (shared, tracker2, stop) = (self.shared.clone(), tracker.clone(), shutdown.clone());
            tracker.spawn(async move {
                let mut n = 0u64;
                loop {
                    let accepted = tokio::select! {
                        _ = stop.cancelled() => break,
                        a = l.accept() => a,
                    };
                    match accepted {
                        Ok((sock, _)) => {
                            n += 1;
                            let key = sock
                                .peer_cred()
                                .map_or(ClientKey::UnknownUnix, |c| ClientKey::Uid(c.uid()));
                            tracker2.spawn(connection(
                                Transport::Unix(sock),
                                Peer::default(),
                                key,
                                format!("unix#{n}"),
                                shared.clone(),
                                stop.clone(),
                            ));
                        }
                        Err(e) => accept_error(e).await,
                    }
                }
            });
        }

        shutdown.cancelled().await;
        tracing::info!("shutting down: no new connections, draining sessions");
        tracker.close();
        if tokio::time::timeout(DRAIN_TIMEOUT, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(timeout = ?DRAIN_TIMEOUT, "sessions still busy after the drain timeout; exiting anyway");
        }
        for lun in self.shared.registry.luns() {
            if let Err(e) = lun.device().flush().await {
                tracing::error!(lun = %lun.lun.path().display(), error = %e, "final flush failed");
            }
        }
        if let Some(p) = unix_path {
            let _ = std::fs::remove_file(p);
        }
        let _ = control.await;
        if let Some(m) = migration {
            let _ = m.await;
        }
        let _ = trimmer.await;
        tracing::info!("stopped");
    }
}

/// Out of file descriptors and the like: log and back off instead of
/// spinning.
async fn accept_error(e: std::io::Error) {
    tracing::warn!(error = %e, "accept failed");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

async fn connection(
    io: Transport,
    peer: Peer,
    key: ClientKey,
    who: String,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    tracing::debug!(client = %who, "connected");
    // Refused connections are closed before the greeting: there is no way
    // to tell an NBD client why before option haggling.
    let _admitted = match shared.admission.admit(key) {
        Ok(a) => a,
        Err(open) => {
            tracing::warn!(client = %who, %key, open, limit = shared.admission.per_client,
                "connection refused: the client is at max_connections_per_client");
            return;
        }
    };
    let Some(memory) = shared.memory.connection(shared.max_in_flight) else {
        tracing::warn!(client = %who, used = shared.memory.used(), limit = shared.memory.limit(),
            "connection refused: max_memory has no room for another connection");
        return;
    };
    let hs = tokio::select! {
        r = tokio::time::timeout(shared.handshake_timeout, negotiate(io, peer, &shared.hs)) => r,
        _ = shutdown.cancelled() => return,
    };
    let (io, buffered, negotiated, peer) = match hs {
        Err(_) => {
            tracing::warn!(client = %who, timeout = ?shared.handshake_timeout, "handshake timed out");
            return;
        }
        Ok(Err(e)) => {
            tracing::warn!(client = %who, error = %e, "handshake failed");
            return;
        }
        Ok(Ok(Outcome::Closed)) => {
            tracing::debug!(client = %who, "closed during handshake");
            return;
        }
        Ok(Ok(Outcome::Transmission {
            io,
            buffered,
            negotiated,
            peer,
        })) => (io, buffered, negotiated, peer),
    };
    let export = negotiated.export.name.clone();
    tracing::info!(client = %who, export = %export, tls = io.is_tls(), identities = ?peer.cert_names,
        structured = negotiated.structured, extended = negotiated.extended, flags = format!("{:#x}", negotiated.flags), "transmission");
    let exp = negotiated.export.clone();
    crate::export::ExportStats::add(&exp.stats.connections, 1);
    let end = session::serve(io, buffered, negotiated, memory, shutdown).await;
    crate::export::ExportStats::sub(&exp.stats.connections, 1);
    match end {
        Ok(End::Disconnect) => {
            tracing::info!(client = %who, export = %export, "client disconnected")
        }
        Ok(End::Eof) => {
            tracing::info!(client = %who, export = %export, "client closed the connection")
        }
        Ok(End::Shutdown) => {
            tracing::info!(client = %who, export = %export, "session drained for shutdown")
        }
        Ok(End::AbsurdWrite) => {
            tracing::warn!(client = %who, export = %export, "closed after a write of absurd length")
        }
        Err(e) => {
            tracing::warn!(client = %who, export = %export, error = %e, "session ended with an error")
        }
    }
}

/// The real server on 127.0.0.1:0 with a real LUN file, driven by a raw
/// byte-level client: the cases real clients never send.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::proto::*;
    use lun_manager::{Access, CreateSpec, Layout, Lun};
    use lungate_config::GatewayConfig;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    struct Fixture {
        _dir: tempfile::TempDir,
        lun_path: PathBuf,
        addr: SocketAddr,
        stop: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    async fn start(tls_mode: TlsMode) -> Fixture {
        start_with(tls_mode, vec![]).await
    }

    async fn start_with(tls_mode: TlsMode, allow: Vec<String>) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let lun_path = dir.path().join("vm.lun");
        let spec = CreateSpec {
            name: "vm".into(),
            disks: vec![1 << 20, 2 << 20],
            memory: 16 << 20,
            vcpus: 1,
            layout: Layout::Offset,
            cluster_size: 0,
            checksums: false,
        };
        Lun::create(&lun_path, &spec).unwrap();
        let cfg = GatewayConfig {
            pools: vec![dir.path().to_path_buf()],
            allow,
            ..GatewayConfig::default()
        };
        let engine =
            lungate_block::engine::IoEngine::new(lungate_block::engine::EngineKind::Auto, 2)
                .unwrap();
        let registry = crate::config::build_registry(&cfg, &engine).unwrap();
        assert_eq!(registry.exports.current().len(), 2);
        let settings = ServerSettings {
            listen: vec!["127.0.0.1:0".parse().unwrap()],
            unix: None,
            tls_mode,
            tls: None,
            max_in_flight: 64 << 20,
            memory: MemoryBudget::new(1 << 30),
            max_connections_per_client: 64,
            handshake_timeout: Duration::from_secs(10),
            control_unix: None,
            control_tcp: None,
            control_tls: None,
            migration_listen: None,
            activated: Vec::new(),
        };
        let server = Server::bind(settings, registry).await.unwrap();
        let addr = match &server.listening()[0] {
            Listening::Tcp(a) => *a,
            other => panic!("{other}"),
        };
        let stop = CancellationToken::new();
        let task = tokio::spawn(server.run(stop.clone()));
        Fixture {
            _dir: dir,
            lun_path,
            addr,
            stop,
            task,
        }
    }

    impl Fixture {
        async fn stop(self) {
            self.stop.cancel();
            self.task.await.unwrap();
        }
        fn hidden_digest(&self) -> [u8; 32] {
            Lun::open(&self.lun_path, Access::ReadOnly)
                .unwrap()
                .hidden_digest()
                .unwrap()
        }
    }

    async fn hello(addr: SocketAddr, client_flags: u32) -> TcpStream {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).await.unwrap();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(u16::from_be_bytes([g[16], g[17]]), 3);
        s.write_u32(client_flags).await.unwrap();
        s
    }

    async fn send_opt(s: &mut TcpStream, option: u32, data: &[u8]) {
        s.write_u64(IHAVEOPT).await.unwrap();
        s.write_u32(option).await.unwrap();
        s.write_u32(data.len() as u32).await.unwrap();
        s.write_all(data).await.unwrap();
    }

    async fn opt_reply(s: &mut TcpStream) -> (u32, u32, Vec<u8>) {
        assert_eq!(s.read_u64().await.unwrap(), OPTION_REPLY_MAGIC);
        let option = s.read_u32().await.unwrap();
        let kind = s.read_u32().await.unwrap();
        let len = s.read_u32().await.unwrap();
        let mut data = vec![0; len as usize];
        s.read_exact(&mut data).await.unwrap();
        (option, kind, data)
    }

    fn go_payload(name: &str) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        d
    }

    /// GO into `name` with simple replies; returns the export size.
    async fn go(s: &mut TcpStream, name: &str) -> u64 {
        send_opt(s, opt::GO, &go_payload(name)).await;
        let mut size = None;
        loop {
            let (o, kind, data) = opt_reply(s).await;
            assert_eq!(o, opt::GO);
            match kind {
                rep::INFO if u16::from_be_bytes([data[0], data[1]]) == info::EXPORT => {
                    size = Some(u64::from_be_bytes(data[2..10].try_into().unwrap()));
                }
                rep::INFO => {}
                rep::ACK => return size.unwrap(),
                other => panic!(
                    "GO failed with reply {other:#x}: {}",
                    String::from_utf8_lossy(&data)
                ),
            }
        }
    }

    async fn request(
        s: &mut TcpStream,
        flags: u16,
        cmd: Command,
        handle: u64,
        off: u64,
        len: u32,
        payload: &[u8],
    ) {
        let mut b = Vec::with_capacity(28 + payload.len());
        b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&cmd.to_wire().to_be_bytes());
        b.extend_from_slice(&handle.to_be_bytes());
        b.extend_from_slice(&off.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        s.write_all(&b).await.unwrap();
    }

    /// (error, handle) of one simple reply; `data_len` bytes of read data
    /// follow a successful read.
    async fn simple_reply(s: &mut TcpStream, data_len: usize) -> (u32, u64, Vec<u8>) {
        assert_eq!(s.read_u32().await.unwrap(), SIMPLE_REPLY_MAGIC);
        let error = s.read_u32().await.unwrap();
        let handle = s.read_u64().await.unwrap();
        let mut data = vec![0; if error == 0 { data_len } else { 0 }];
        s.read_exact(&mut data).await.unwrap();
        (error, handle, data)
    }

    async fn closed(s: &mut TcpStream) -> bool {
        let mut b = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    #[tokio::test]
    async fn client_without_fixed_newstyle_is_disconnected() {
        let f = start(TlsMode::Off).await;
        let mut s = hello(f.addr, 0).await;
        assert!(closed(&mut s).await);
        let mut s = hello(f.addr, 1 << 5).await; // unknown client flag
        assert!(closed(&mut s).await);
        f.stop().await;
    }

    #[tokio::test]
    async fn unknown_and_oversized_options_get_errors_and_haggling_continues() {
        let f = start(TlsMode::Off).await;
        let mut s = hello(f.addr, 3).await;
        send_opt(&mut s, 99, b"whatever").await;
        assert_eq!(opt_reply(&mut s).await.1, rep::ERR_UNSUP);
        send_opt(&mut s, opt::INFO, &vec![0u8; 100_000]).await;
        assert_eq!(opt_reply(&mut s).await.1, rep::ERR_TOO_BIG);
        send_opt(&mut s, opt::GO, &[0, 0, 0, 50, 0, 0]).await; // name longer than payload
        assert_eq!(opt_reply(&mut s).await.1, rep::ERR_INVALID);
        send_opt(&mut s, opt::GO, &go_payload("nope/disk0")).await;
        assert_eq!(opt_reply(&mut s).await.1, rep::ERR_UNKNOWN);
        send_opt(&mut s, opt::STARTTLS, b"").await;
        assert_eq!(opt_reply(&mut s).await.1, rep::ERR_POLICY);
        send_opt(&mut s, opt::SET_META_CONTEXT, b"").await;
        assert_eq!(
            opt_reply(&mut s).await.1,
            rep::ERR_INVALID,
            "needs structured replies"
        );
        send_opt(&mut s, opt::LIST, b"").await;
        let mut names = vec![];
        loop {
            let (_, kind, data) = opt_reply(&mut s).await;
            if kind == rep::ACK {
                break;
            }
            assert_eq!(kind, rep::SERVER);
            let n = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
            names.push(String::from_utf8(data[4..4 + n].to_vec()).unwrap());
        }
        assert_eq!(names, vec!["vm/disk0", "vm/disk1"]);
        assert_eq!(go(&mut s, "vm/disk1").await, 2 << 20);
        request(&mut s, 0, Command::Disc, 1, 0, 0, &[]).await;
        assert!(closed(&mut s).await);
        f.stop().await;
    }

    #[tokio::test]
    async fn denied_exports_are_unlisted_and_unknown() {
        let f = start_with(TlsMode::Off, vec!["10.0.0.0/8".into(), "cert:vm".into()]).await;
        let mut s = hello(f.addr, 3).await;
        send_opt(&mut s, opt::LIST, b"").await;
        assert_eq!(
            opt_reply(&mut s).await.1,
            rep::ACK,
            "nothing listed for 127.0.0.1"
        );
        send_opt(&mut s, opt::GO, &go_payload("vm/disk0")).await;
        assert_eq!(opt_reply(&mut s).await.1, rep::ERR_UNKNOWN);
        send_opt(&mut s, opt::EXPORT_NAME, b"vm/disk0").await;
        assert!(closed(&mut s).await);
        f.stop().await;
        let f = start_with(TlsMode::Off, vec!["127.0.0.0/8".into()]).await;
        let mut s = hello(f.addr, 3).await;
        assert_eq!(go(&mut s, "vm/disk0").await, 1 << 20);
        f.stop().await;
    }

    #[tokio::test]
    async fn tls_required_refuses_options_and_export_name() {
        let f = start(TlsMode::Require).await;
        let mut s = hello(f.addr, 3).await;
        send_opt(&mut s, opt::LIST, b"").await;
        assert_eq!(opt_reply(&mut s).await.1, rep::ERR_TLS_REQD);
        send_opt(&mut s, opt::GO, &go_payload("vm/disk0")).await;
        assert_eq!(opt_reply(&mut s).await.1, rep::ERR_TLS_REQD);
        send_opt(&mut s, opt::EXPORT_NAME, b"vm/disk0").await;
        assert!(closed(&mut s).await, "EXPORT_NAME cannot error: hang up");
        f.stop().await;
    }

    #[tokio::test]
    async fn export_name_with_and_without_zeroes() {
        let f = start(TlsMode::Off).await;
        for (flags, tail) in [(1u32, 124usize), (3, 0)] {
            let mut s = hello(f.addr, flags).await;
            send_opt(&mut s, opt::EXPORT_NAME, b"vm/disk0").await;
            assert_eq!(s.read_u64().await.unwrap(), 1 << 20);
            let tx = s.read_u16().await.unwrap();
            assert_ne!(tx & tx_flags::HAS_FLAGS, 0);
            assert_eq!(
                tx & tx_flags::SEND_DF,
                0,
                "no DF without structured replies"
            );
            let mut z = vec![1u8; tail];
            s.read_exact(&mut z).await.unwrap();
            assert!(z.iter().all(|b| *b == 0));
            // The next bytes must be a reply to our request, not padding.
            request(&mut s, 0, Command::Flush, 7, 0, 0, &[]).await;
            assert_eq!(simple_reply(&mut s, 0).await.1, 7);
        }
        f.stop().await;
    }

    #[tokio::test]
    async fn hostile_requests_get_errors_and_never_touch_hidden_regions() {
        let f = start(TlsMode::Off).await;
        let before = f.hidden_digest();
        let mut s = hello(f.addr, 3).await;
        let size = go(&mut s, "vm/disk0").await;
        let cases: Vec<(Command, u64, u32, u32)> = vec![
            (Command::Write, size - 512, 1024, NbdError::NoSpc.code()),
            (Command::Write, u64::MAX - 100, 512, NbdError::NoSpc.code()),
            (Command::Read, size, 1, NbdError::Inval.code()),
            (Command::Read, u64::MAX, 4096, NbdError::Inval.code()),
            (Command::Trim, size - 4096, 8192, NbdError::Inval.code()),
            (Command::WriteZeroes, size, 4096, NbdError::NoSpc.code()),
            (Command::BlockStatus, 0, 4096, NbdError::Inval.code()), // no context
            (Command::Unknown(42), 0, 0, NbdError::Inval.code()),
        ];
        for (i, (cmd, off, len, want)) in cases.iter().enumerate() {
            let payload = if *cmd == Command::Write {
                vec![0xee; *len as usize]
            } else {
                vec![]
            };
            request(&mut s, 0, *cmd, i as u64, *off, *len, &payload).await;
            let (err, handle, _) = simple_reply(&mut s, 0).await;
            assert_eq!((err, handle), (*want, i as u64), "{cmd:?} at {off}+{len}");
        }
        // Oversized WRITE (beyond the 64 MiB maximum): payload discarded,
        // EINVAL, connection usable.
        let big = (64u32 << 20) + 512;
        request(
            &mut s,
            0,
            Command::Write,
            100,
            0,
            big,
            &vec![0xee; big as usize],
        )
        .await;
        assert_eq!(simple_reply(&mut s, 0).await.0, NbdError::Inval.code());
        // Bad flag for the command.
        request(&mut s, cmd_flags::REQ_ONE, Command::Read, 101, 0, 512, &[]).await;
        assert_eq!(simple_reply(&mut s, 0).await.0, NbdError::Inval.code());
        // Writes at both edges of the region succeed and read back.
        request(&mut s, 0, Command::Write, 102, 0, 512, &[0xa1; 512]).await;
        request(
            &mut s,
            cmd_flags::FUA,
            Command::Write,
            103,
            size - 512,
            512,
            &[0xa2; 512],
        )
        .await;
        let mut handles = [simple_reply(&mut s, 0).await, simple_reply(&mut s, 0).await];
        handles.sort_by_key(|r| r.1);
        assert_eq!((handles[0].0, handles[1].0), (0, 0));
        request(&mut s, 0, Command::Read, 104, size - 512, 512, &[]).await;
        let (err, _, data) = simple_reply(&mut s, 512).await;
        assert_eq!(err, 0);
        assert!(data.iter().all(|b| *b == 0xa2));
        request(&mut s, 0, Command::Disc, 105, 0, 0, &[]).await;
        assert!(closed(&mut s).await);
        assert_eq!(
            before,
            f.hidden_digest(),
            "bytes outside the disk regions changed"
        );
        f.stop().await;
    }

    #[tokio::test]
    async fn absurd_lengths_get_an_error_then_a_hang_up() {
        let f = start(TlsMode::Off).await;
        let mut s = hello(f.addr, 3).await;
        s.write_u64(IHAVEOPT).await.unwrap();
        s.write_u32(opt::GO).await.unwrap();
        s.write_u32(0xffff_fff0).await.unwrap();
        assert_eq!(opt_reply(&mut s).await.1, rep::ERR_TOO_BIG);
        assert!(closed(&mut s).await, "absurd option must end the handshake");

        let mut s = hello(f.addr, 3).await;
        go(&mut s, "vm/disk0").await;
        request(&mut s, 0, Command::Write, 9, 0, u32::MAX, &[0u8; 4096]).await;
        let (err, handle, _) = simple_reply(&mut s, 0).await;
        assert_eq!((err, handle), (NbdError::Inval.code(), 9));
        assert!(closed(&mut s).await, "absurd write must end the session");

        // Other clients are unaffected.
        let mut s = hello(f.addr, 3).await;
        go(&mut s, "vm/disk0").await;
        request(&mut s, 0, Command::Read, 10, 0, 4096, &[]).await;
        assert_eq!(simple_reply(&mut s, 4096).await.0, 0);
        f.stop().await;
    }

    /// One extended request (32-byte header, 64-bit length).
    async fn ext_request(
        s: &mut TcpStream,
        flags: u16,
        cmd: Command,
        handle: u64,
        off: u64,
        len: u64,
        payload: &[u8],
    ) {
        let mut b = Vec::with_capacity(32 + payload.len());
        b.extend_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&cmd.to_wire().to_be_bytes());
        b.extend_from_slice(&handle.to_be_bytes());
        b.extend_from_slice(&off.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        s.write_all(&b).await.unwrap();
    }

    /// One extended reply chunk: (flags, type, handle, offset, payload).
    async fn ext_chunk(s: &mut TcpStream) -> (u16, u16, u64, u64, Vec<u8>) {
        assert_eq!(s.read_u32().await.unwrap(), EXTENDED_REPLY_MAGIC);
        let flags = s.read_u16().await.unwrap();
        let kind = s.read_u16().await.unwrap();
        let handle = s.read_u64().await.unwrap();
        let offset = s.read_u64().await.unwrap();
        let len = s.read_u64().await.unwrap();
        let mut data = vec![0; len as usize];
        s.read_exact(&mut data).await.unwrap();
        (flags, kind, handle, offset, data)
    }

    #[tokio::test]
    async fn extended_headers_frame_requests_and_replies_at_64_bits() {
        let f = start(TlsMode::Off).await;
        let mut s = hello(f.addr, 3).await;
        send_opt(&mut s, opt::EXTENDED_HEADERS, b"x").await;
        assert_eq!(opt_reply(&mut s).await.1, rep::ERR_INVALID, "takes no data");
        send_opt(&mut s, opt::EXTENDED_HEADERS, b"").await;
        assert_eq!(opt_reply(&mut s).await.1, rep::ACK);
        send_opt(&mut s, opt::STRUCTURED_REPLY, b"").await;
        assert_eq!(
            opt_reply(&mut s).await.1,
            rep::ERR_EXT_HEADER_REQD,
            "no downgrade to structured replies"
        );
        let size = go(&mut s, "vm/disk1").await;
        // WRITE with PAYLOAD_LEN: payload follows; the reply is an extended
        // NONE chunk repeating the offset (no simple replies any more).
        ext_request(
            &mut s,
            cmd_flags::PAYLOAD_LEN,
            Command::Write,
            1,
            4096,
            512,
            &[0x5a; 512],
        )
        .await;
        let (fl, kind, h, off, _) = ext_chunk(&mut s).await;
        assert_eq!(
            (fl, kind, h, off),
            (reply_flags::DONE, chunk::NONE, 1, 4096)
        );
        ext_request(&mut s, 0, Command::Read, 2, 4096, 512, &[]).await;
        let (fl, kind, h, off, data) = ext_chunk(&mut s).await;
        assert_eq!(
            (fl, kind, h, off),
            (reply_flags::DONE, chunk::OFFSET_DATA, 2, 4096)
        );
        assert_eq!(&data[..8], &4096u64.to_be_bytes());
        assert!(data[8..].iter().all(|b| *b == 0x5a));
        // A 64-bit effect length past the end is refused, not truncated to
        // 32 bits (which would fit).
        ext_request(&mut s, 0, Command::Trim, 3, 0, (1 << 32) + 4096, &[]).await;
        let (_, kind, h, _, body) = ext_chunk(&mut s).await;
        assert_eq!((kind, h), (chunk::ERROR, 3));
        assert_eq!(
            u32::from_be_bytes(body[..4].try_into().unwrap()),
            NbdError::Inval.code()
        );
        ext_request(&mut s, 0, Command::WriteZeroes, 4, 0, size, &[]).await;
        assert_eq!(
            ext_chunk(&mut s).await.1,
            chunk::NONE,
            "zero the whole disk in one request"
        );
        // A payload on a command that takes none is read, then refused.
        ext_request(
            &mut s,
            cmd_flags::PAYLOAD_LEN,
            Command::Flush,
            5,
            0,
            16,
            &[0; 16],
        )
        .await;
        assert_eq!(ext_chunk(&mut s).await.1, chunk::ERROR);
        ext_request(&mut s, 0, Command::Flush, 6, 0, 0, &[]).await;
        let (_, kind, h, _, _) = ext_chunk(&mut s).await;
        assert_eq!(
            (kind, h),
            (chunk::NONE, 6),
            "framing kept after the refused payload"
        );
        ext_request(&mut s, 0, Command::Disc, 7, 0, 0, &[]).await;
        assert!(closed(&mut s).await);

        // EXPORT_NAME after extended headers: the spec forbids it; hang up.
        let mut s = hello(f.addr, 3).await;
        send_opt(&mut s, opt::EXTENDED_HEADERS, b"").await;
        assert_eq!(opt_reply(&mut s).await.1, rep::ACK);
        send_opt(&mut s, opt::EXPORT_NAME, b"vm/disk0").await;
        assert!(closed(&mut s).await);
        f.stop().await;
    }

    #[tokio::test]
    async fn pipelined_requests_all_get_replies() {
        let f = start(TlsMode::Off).await;
        let mut s = hello(f.addr, 3).await;
        go(&mut s, "vm/disk1").await;
        // 200 writes then 200 reads, sent without waiting for any reply.
        let mut wire = Vec::new();
        for i in 0..200u64 {
            let mut b = Vec::new();
            b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
            b.extend_from_slice(&0u16.to_be_bytes());
            b.extend_from_slice(&Command::Write.to_wire().to_be_bytes());
            b.extend_from_slice(&i.to_be_bytes());
            b.extend_from_slice(&(i * 4096).to_be_bytes());
            b.extend_from_slice(&4096u32.to_be_bytes());
            b.extend_from_slice(&[i as u8; 4096]);
            wire.extend_from_slice(&b);
        }
        s.write_all(&wire).await.unwrap();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let (err, h, _) = simple_reply(&mut s, 0).await;
            assert_eq!(err, 0);
            assert!(seen.insert(h), "duplicate reply for handle {h}");
        }
        for i in 0..200u64 {
            request(&mut s, 0, Command::Read, 1000 + i, i * 4096, 4096, &[]).await;
        }
        for _ in 0..200 {
            let (err, h, data) = simple_reply(&mut s, 4096).await;
            assert_eq!(err, 0);
            let i = h - 1000;
            assert!(
                data.iter().all(|b| *b == i as u8),
                "read {i} returned wrong data"
            );
        }
        f.stop().await;
    }
}
