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
use lun_manager::backend::{Extent, IoEngine};
use lun_manager::volume::{self, Volume, VolumeConfig};
use lun_manager::{Access, Lun};

use crate::switch::{Gate, Paused, SwitchStats};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot open LUN {path}: {source}")]
    Lun {
        path: PathBuf,
        source: lun_manager::Error,
    },
    #[error("cannot open the volume of LUN {path}: {source}")]
    Volume {
        path: PathBuf,
        source: volume::Error,
    },
    #[error("LUN {path} is in use by another process (it holds the LUN's lock); stop it or use its control API")]
    Busy { path: PathBuf },
    #[error("cannot lock LUN {path}: {source}")]
    Lock { path: PathBuf, source: io::Error },
}

/// The LUN's volume. One per LUN per process.
// MERGE: becomes lun.volume().clone()
fn volume_of(lun: &Lun) -> Result<Arc<Volume>, volume::Error> {
    Ok(Arc::new(Volume::open(VolumeConfig::for_lun(
        lun,
        Default::default(),
    ))?))
}

/// `flock` on the LUN file, held for as long as the gateway serves it:
/// exclusive when serving read-write, shared when read-only. A SIGKILL
/// releases it with the process.
// MERGE: owner::acquire (flock + Owner record with the control socket)
#[derive(Debug)]
pub struct OwnerLock {
    _file: File,
}

impl OwnerLock {
    pub fn acquire(path: &Path, exclusive: bool) -> Result<OwnerLock, ServeError> {
        let file = File::open(path).map_err(|source| ServeError::Lock {
            path: path.into(),
            source,
        })?;
        let op = if exclusive {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        // SAFETY: flock only reads its integer arguments; the fd is owned by
        // `file`, which lives as long as the returned guard.
        let rc = unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) };
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
        Ok(OwnerLock { _file: file })
    }
}

#[derive(Debug)]
pub struct ServedLun {
    pub lun: Arc<Lun>,
    pub volume: Arc<Volume>,
    pub gate: Arc<Gate>,
    /// Held by every tree operation of the control API for its whole run,
    /// so a snapshot waiting behind a long flatten or delete waits *before*
    /// it pauses the LUN's I/O, not inside the pause.
    pub maintenance: tokio::sync::Mutex<()>,
    pub read_only: bool,
    /// Canonical path, the key that makes one `ServedLun` per file.
    pub key: PathBuf,
    plain: AtomicBool,
    _owner: OwnerLock,
}

impl ServedLun {
    /// Lock, open and wrap the LUN at `path`.
    pub fn open(
        path: &Path,
        read_only: bool,
        stats: Arc<SwitchStats>,
    ) -> Result<ServedLun, ServeError> {
        let owner = OwnerLock::acquire(path, !read_only)?;
        let access = if read_only {
            Access::ReadOnly
        } else {
            Access::ReadWrite
        };
        let lun = Lun::open(path, access).map_err(|source| ServeError::Lun {
            path: path.into(),
            source,
        })?;
        let volume = volume_of(&lun).map_err(|source| ServeError::Volume {
            path: path.into(),
            source,
        })?;
        Ok(Self::from_parts(
            Arc::new(lun),
            volume,
            read_only,
            owner,
            stats,
        ))
    }

    /// Wrap a LUN whose volume is already open (a fresh clone).
    pub fn from_parts(
        lun: Arc<Lun>,
        volume: Arc<Volume>,
        read_only: bool,
        owner: OwnerLock,
        stats: Arc<SwitchStats>,
    ) -> ServedLun {
        let key = std::fs::canonicalize(lun.path()).unwrap_or_else(|_| lun.path().to_path_buf());
        let s = ServedLun {
            lun,
            volume,
            gate: Gate::new(stats),
            maintenance: tokio::sync::Mutex::new(()),
            read_only,
            key,
            plain: AtomicBool::new(false),
            _owner: owner,
        };
        s.refresh_plain();
        s
    }

    /// Re-read whether the volume has layers. Call only while paused (or
    /// before serving), so no request is running on the old choice.
    pub fn refresh_plain(&self) {
        let plain = self.volume.chain() == [self.lun.uuid()];
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
        let v = self.volume.clone();
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
