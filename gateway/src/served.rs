//! One LUN this gateway serves: the open [`Lun`], its one [`Volume`]
//! (shared by every export and connection of the LUN), the ownership lock,
//! and the LUN's block-device stack below the region views of its exports:
//! the live-switch [`GateDevice`] over the volume's [`VolumeDevice`], whose
//! layers do their I/O on the gateway's engine. A LUN without snapshots is
//! a chain of length one, served by the same path.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use lun_manager::{owner, Access, Lun};
use lungate_block::engine::IoEngine;
use lungate_block::volume::{Volume, VolumeDevice};
use lungate_block::BlockDevice;

use crate::switch::{Gate, GateDevice, Paused, SwitchStats};

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
    _file: Option<File>,
}

impl SharedLock {
    pub fn acquire(path: &Path) -> Result<SharedLock, ServeError> {
        if lun_manager::backing::is_rbd(path) {
            // Readers of an RBD image need no lock (its exclusive lock is
            // the writers' alone).
            return Ok(SharedLock { _file: None });
        }
        let file = File::open(path).map_err(|source| ServeError::Lock {
            path: path.into(),
            source,
        })?;
        match lungate_block::sys::flock(&file, lungate_block::sys::Lock::Shared) {
            Ok(true) => {}
            Ok(false) => return Err(ServeError::Busy { path: path.into() }),
            Err(source) => {
                return Err(ServeError::Lock {
                    path: path.into(),
                    source,
                })
            }
        }
        Ok(SharedLock { _file: Some(file) })
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
    /// Whether a migration is moving the LUN away, or has (see
    /// [`crate::migrate`]): tree operations are queued meanwhile.
    pub migration: crate::migrate::LunMigration,
    /// The gate over the volume: what the region views of the LUN's
    /// exports sit on.
    gate_dev: Arc<GateDevice>,
    dev: Arc<dyn BlockDevice>,
    owner: Ownership,
}

impl std::fmt::Debug for ServedLun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServedLun")
            .field("key", &self.key)
            .field("read_only", &self.read_only)
            .finish()
    }
}

impl ServedLun {
    /// Lock, open and wrap the LUN at `path`. A read-write LUN gets this
    /// gateway's `Owner` record, naming `control` (its control socket).
    pub fn open(
        path: &Path,
        read_only: bool,
        control: Option<&Path>,
        stats: Arc<SwitchStats>,
        engine: &IoEngine,
    ) -> Result<ServedLun, ServeError> {
        let lun_err = |source| ServeError::Lun {
            path: path.into(),
            source,
        };
        if read_only {
            let lock = SharedLock::acquire(path)?;
            let lun =
                Lun::open_with(path, Access::ReadOnly, Some(engine.clone())).map_err(lun_err)?;
            return Ok(Self::from_parts(lun, true, Ownership::Shared(lock), stats));
        }
        // Locked before the open: opening a volume read-write may replay its
        // journal, which nobody else may be doing at the same time.
        let lock = owner::lock(path).map_err(|e| owner_err(path, e))?;
        let mut lun =
            Lun::open_with(path, Access::ReadWrite, Some(engine.clone())).map_err(lun_err)?;
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
        let gate = Gate::new(stats);
        let volume: Arc<dyn BlockDevice> = Arc::new(VolumeDevice::new(lun.volume().clone()));
        let gate_dev = Arc::new(GateDevice::new(gate.clone(), volume));
        ServedLun {
            dev: gate_dev.clone(),
            gate_dev,
            lun: Arc::new(lun),
            gate,
            maintenance: tokio::sync::Mutex::new(()),
            read_only,
            key,
            migration: Default::default(),
            owner,
        }
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

    /// The LUN's stack below its exports' region views (gate, volume).
    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.dev
    }

    /// Stop the data path of this LUN (every export, every connection) and
    /// wait for running requests; see [`crate::switch`].
    pub async fn pause(&self) -> Paused {
        self.gate.pause().await
    }

    /// Put `below` under the LUN's gate in place of its volume (or of what
    /// a previous call put there), while `paused`: from then on every
    /// request of every export and connection of the LUN, the parked ones
    /// first, goes to `below` (a migration's forwarding to the new owner).
    pub fn swap_below(&self, paused: &Paused, below: Arc<dyn BlockDevice>) -> Arc<dyn BlockDevice> {
        self.gate_dev.swap(paused, below)
    }
}
