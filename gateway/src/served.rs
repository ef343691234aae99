//! One LUN this gateway serves: the open [`Lun`], its one [`Volume`] (shared
//! by every export and connection of the LUN), the ownership lock, and the
//! live-switch [`Gate`] in front of its data path.
//!
//! Data path choice, made per request under the gate: while the volume is
//! *plain* (no layers: the LUN file is the whole chain) requests go to the
//! io_uring [`IoEngine`] on the LUN file, exactly as the volume itself
//! would do them, only asynchronously; once it has layers they go to the
//! volume on tokio's blocking pool. The flag changes only inside a pause
//! (snapshot, revert, clone), when no request is running, so no request
//! ever sees a half-switched LUN. Offsets here are LUN byte offsets; the
//! export (region view) has already checked and translated them.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use lun_manager::{owner, Access, Lun};
use lungate_block::engine::{Extent, IoEngine};
use lungate_block::volume::{self, Volume};

use crate::switch::{Gate, Paused, SwitchStats};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot open LUN {path}: {source}")]
    Lun {
        path: PathBuf,
        source: lun_manager::Error,
    },
    #[error("LUN {path} is in use by another process (it holds the LUN's lock); stop it or use its control API")]
    Busy { path: PathBuf },
    #[error("cannot lock LUN {path}: {source}")]
    Lock { path: PathBuf, source: io::Error },
}

/// A shared `flock` on the LUN file, held while the gateway serves it
/// read-only (a read-write gateway holds [`owner::OwnerGuard`] instead).
/// A SIGKILL releases it with the process.
#[derive(Debug)]
pub struct SharedLock {
    _file: File,
}

impl SharedLock {
    pub fn acquire(path: &Path) -> Result<SharedLock, ServeError> {
        let file = File::open(path).map_err(|source| ServeError::Lock {
            path: path.into(),
            source,
        })?;
        // SAFETY: flock only reads its integer arguments; the fd is owned by
        // `file`, which lives as long as the returned guard.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                ServeError::Busy { path: path.into() }
            } else {
                ServeError::Lock {
                    path: path.into(),
                    source: e,
                }
            });
        }
        Ok(SharedLock { _file: file })
    }
}

/// How this gateway holds a served LUN.
#[derive(Debug)]
pub enum Ownership {
    /// Read-write: the exclusive lock plus the `Owner` record naming this
    /// gateway and its control socket (so `lunctl` routes to it).
    Owner(owner::OwnerGuard),
    /// Read-only: a shared lock.
    Shared(SharedLock),
}

fn owner_err(path: &Path, e: owner::Error) -> ServeError {
    match e {
        owner::Error::Owned { .. } | owner::Error::Locked { .. } => {
            ServeError::Busy { path: path.into() }
        }
        owner::Error::Io { source, .. } => ServeError::Lock {
            path: path.into(),
            source,
        },
        owner::Error::Lun(source) => ServeError::Lun {
            path: path.into(),
            source,
        },
    }
}

/// Take ownership of a LUN this process already opened read-write (a
/// fresh clone): lock plus `Owner` record.
pub fn own(lun: &mut Lun, control: Option<&Path>) -> Result<Ownership, ServeError> {
    let path = lun.path().to_path_buf();
    owner::acquire(lun, "lungate", control)
        .map(Ownership::Owner)
        .map_err(|e| owner_err(&path, e))
}

#[derive(Debug)]
pub struct ServedLun {
    pub lun: Arc<Lun>,
    pub gate: Arc<Gate>,
    /// Held by every tree operation of the control API for its whole run,
    /// so a snapshot waiting behind a long flatten or delete waits *before*
    /// it pauses the LUN's I/O, not inside the pause.
    pub maintenance: tokio::sync::Mutex<()>,
    pub read_only: bool,
    /// Canonical path, the key that makes one `ServedLun` per file.
    pub key: PathBuf,
    plain: AtomicBool,
    owner: Ownership,
}

impl ServedLun {
    /// Lock, open and wrap the LUN at `path`. A read-write LUN gets this
    /// gateway's `Owner` record, naming `control` (its control socket).
    pub fn open(
        path: &Path,
        read_only: bool,
        control: Option<&Path>,
        stats: Arc<SwitchStats>,
    ) -> Result<ServedLun, ServeError> {
        let lun_err = |source| ServeError::Lun {
            path: path.into(),
            source,
        };
        if read_only {
            let lock = SharedLock::acquire(path)?;
            let lun = Lun::open(path, Access::ReadOnly).map_err(lun_err)?;
            return Ok(Self::from_parts(lun, true, Ownership::Shared(lock), stats));
        }
        // Locked before the open: opening a volume read-write may replay its
        // journal, which nobody else may be doing at the same time.
        let lock = owner::lock(path).map_err(|e| owner_err(path, e))?;
        let mut lun = Lun::open(path, Access::ReadWrite).map_err(lun_err)?;
        let guard =
            owner::claim(lock, &mut lun, "lungate", control).map_err(|e| owner_err(path, e))?;
        Ok(Self::from_parts(lun, false, Ownership::Owner(guard), stats))
    }

    /// Wrap an open LUN (its volume is the LUN's own).
    pub fn from_parts(
        lun: Lun,
        read_only: bool,
        owner: Ownership,
        stats: Arc<SwitchStats>,
    ) -> ServedLun {
        let key = std::fs::canonicalize(lun.path()).unwrap_or_else(|_| lun.path().to_path_buf());
        let s = ServedLun {
            lun: Arc::new(lun),
            gate: Gate::new(stats),
            maintenance: tokio::sync::Mutex::new(()),
            read_only,
            key,
            plain: AtomicBool::new(false),
            owner,
        };
        s.refresh_plain();
        s
    }

    /// Write this gateway's `Owner` record again (a revert brings back the
    /// state records of the snapshot, the owner record among them).
    pub fn reassert_owner(&self) -> Result<(), owner::Error> {
        let Ownership::Owner(g) = &self.owner else {
            return Ok(());
        };
        let mut h = self.lun.share();
        h.reload_state()?;
        let now: Option<lun_manager::format::state::Owner> =
            h.record_json(lun_manager::format::state::RecordType::Owner, 0)?;
        if now.as_ref() == Some(g.record()) {
            // A snapshot taken while this gateway served the LUN: ours already.
            return Ok(());
        }
        g.rewrite(&mut h)
    }

    /// The LUN's one volume, shared by every export and connection.
    pub fn volume(&self) -> &Arc<Volume> {
        self.lun.volume()
    }

    /// Re-read whether the volume has layers. Call only while paused (or
    /// before serving), so no request is running on the old choice.
    pub fn refresh_plain(&self) {
        let plain = self.volume().chain() == [self.lun.uuid()];
        self.plain.store(plain, Ordering::Release);
    }

    /// Whether requests take the io_uring fast path.
    pub fn is_plain(&self) -> bool {
        self.plain.load(Ordering::Acquire)
    }

    /// Stop the data path of this LUN (every export, every connection) and
    /// wait for running requests; see [`crate::switch`].
    pub async fn pause(&self) -> Paused {
        self.gate.pause().await
    }

    fn file(&self) -> &Arc<File> {
        self.lun.file()
    }

    pub async fn read(&self, engine: &IoEngine, at: u64, len: usize) -> io::Result<Bytes> {
        if self.is_plain() {
            return engine.read(self.file(), at, len).await;
        }
        self.blocking(move |v| {
            let mut buf = vec![0u8; len];
            v.read(at, &mut buf)?;
            Ok(Bytes::from(buf))
        })
        .await
    }

    /// Write; with `fua`, durable (a volume flush) before returning.
    pub async fn write(
        &self,
        engine: &IoEngine,
        at: u64,
        data: Bytes,
        fua: bool,
    ) -> io::Result<()> {
        if self.is_plain() {
            return engine.write(self.file(), at, data, fua).await;
        }
        self.blocking(move |v| {
            v.write(at, &data)?;
            if fua {
                v.flush()?;
            }
            Ok(())
        })
        .await
    }

    /// Every write acknowledged before this call survives a crash.
    pub async fn flush(&self, engine: &IoEngine) -> io::Result<()> {
        if self.is_plain() {
            return engine.flush(self.file()).await;
        }
        self.blocking(|v| v.flush()).await
    }

    /// Deallocate; reads back as zeros.
    pub async fn trim(&self, engine: &IoEngine, at: u64, len: u64) -> io::Result<()> {
        if self.is_plain() {
            return engine.punch_hole(self.file(), at, len).await;
        }
        self.blocking(move |v| v.trim(at, len)).await
    }

    pub async fn write_zeroes(
        &self,
        engine: &IoEngine,
        at: u64,
        len: u64,
        may_trim: bool,
    ) -> io::Result<()> {
        if self.is_plain() {
            return engine.write_zeroes(self.file(), at, len, may_trim).await;
        }
        self.blocking(move |v| v.write_zeroes(at, len, may_trim))
            .await
    }

    /// Allocation of the merged chain over `[at, at + len)`.
    pub async fn extents(&self, engine: &IoEngine, at: u64, len: u64) -> io::Result<Vec<Extent>> {
        if self.is_plain() {
            return engine.extents(self.file(), at, len);
        }
        self.blocking(move |v| v.extents(at, len)).await
    }

    /// Run a synchronous volume call off the reactor.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Volume) -> volume::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let v = self.volume().clone();
        match tokio::task::spawn_blocking(move || f(&v)).await {
            Ok(r) => r.map_err(to_io),
            Err(e) => Err(io::Error::other(format!("volume task failed: {e}"))),
        }
    }
}

/// Volume errors as `io::Error`, keeping the OS error code where there is
/// one (the NBD error mapping is by errno).
pub fn to_io(e: volume::Error) -> io::Error {
    match e {
        volume::Error::Io { source, .. } if source.raw_os_error().is_some() => source,
        volume::Error::OutOfBounds { .. } | volume::Error::Protected { .. } => {
            io::Error::new(io::ErrorKind::InvalidInput, e.to_string())
        }
        other => io::Error::other(other.to_string()),
    }
}
