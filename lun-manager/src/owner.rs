//! Who may change a LUN: the ownership lock.
//!
//! A process that serves or edits a LUN holds `flock(LOCK_EX)` on the LUN
//! file. The kernel drops it when the process dies (SIGKILL included), so a
//! lock is never stale. A gateway also writes the [`Owner`] state record
//! (`owner`, `host`, `pid`, `since`, `control`) so others can tell who holds
//! the lock and where its control API listens; the record alone proves
//! nothing (it survives a crash), only the flock does.
//!
//! This module owns the flock and the `Owner` record. It never waits for a
//! lock (`LOCK_NB`): a busy LUN is reported at once with who holds it.
//!
//! An RBD LUN has no file to flock: its lock is the image's RBD exclusive
//! lock, which [`Lun::open`] takes read-write on the very image handle that
//! does the I/O (a lock on another handle would fence our own writes), and
//! which is released when the LUN is closed or its process dies. Here,
//! [`lock`] and [`probe`] only look at who holds it.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::format::state::{Owner, RecordType};
use crate::lun::{now, Access, Lun};

#[derive(Debug, Error)]
pub enum Error {
    #[error("LUN {lun} is owned by PID {pid} ({owner}) on {host}; stop it or use its control API")]
    Owned {
        lun: String,
        owner: String,
        pid: u32,
        host: String,
    },
    #[error("LUN {lun} is locked by another process that left no owner record; stop it first")]
    Locked { lun: String },
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Lun(#[from] crate::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What [`probe`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// Nobody holds the lock (an `Owner` record left by a dead process is
    /// ignored).
    Free,
    /// A gateway holds it and serves a control API at `control`.
    Gateway { pid: u32, control: PathBuf },
    /// Someone else holds it. `pid` is 0 and `owner` is empty when the
    /// holder wrote no record (e.g. another `lunctl`).
    Busy { owner: String, pid: u32 },
}

/// The flock alone, on a file description of its own (so it is independent
/// of every other descriptor of the LUN, including the caller's `Lun`).
/// Dropping it releases the lock.
#[derive(Debug)]
pub struct FileLock {
    /// Held only for its flock (none for an RBD LUN: see the module docs).
    file: Option<File>,
    path: PathBuf,
}

impl FileLock {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        // Unlock explicitly: a child forked by another thread shares this
        // file description until it execs, and closing our descriptor alone
        // would leave the lock held for that moment.
        if let Some(f) = &self.file {
            lungate_block::sys::unlock(f);
        }
    }
}

enum Try {
    Got(FileLock),
    Held,
}

/// Whether a client holds the RBD exclusive lock of the image at `path`.
#[cfg(feature = "rbd")]
fn rbd_locked(path: &Path) -> Result<bool> {
    use std::sync::Arc;
    let io = |op: &'static str| {
        move |source| Error::Io {
            path: path.to_path_buf(),
            op,
            source,
        }
    };
    let spec = crate::backing::image_spec(path)?;
    let pool = Arc::new(
        lungate_block::store::rbd::Pool::open(&spec.pool).map_err(io("connect to the RBD pool"))?,
    );
    // A read-only handle has no exclusive-lock state to ask; a read-write
    // one takes the lock only when it writes, which this never does.
    let img = pool
        .open_image(&spec.image, true)
        .map_err(io("open RBD image"))?;
    Ok(!img
        .lock_owners()
        .map_err(io("read the RBD lock owners"))?
        .is_empty())
}

#[cfg(not(feature = "rbd"))]
fn rbd_locked(path: &Path) -> Result<bool> {
    crate::backing::Backing::open(path, Access::ReadOnly)?;
    Ok(false)
}

fn try_flock(path: &Path) -> Result<Try> {
    if crate::backing::is_rbd(path) {
        // A takeover breaks the former owner's lock when it opens the
        // image (and refuses anyone else's).
        return Ok(
            if crate::backing::takeover(path).is_none() && rbd_locked(path)? {
                Try::Held
            } else {
                Try::Got(FileLock {
                    file: None,
                    path: path.to_path_buf(),
                })
            },
        );
    }
    let file = OpenOptions::new()
        .read(true)
        .open(path)
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            op: "open for locking",
            source,
        })?;
    match lungate_block::sys::flock(&file, lungate_block::sys::Lock::Exclusive) {
        Ok(true) => Ok(Try::Got(FileLock {
            file: Some(file),
            path: path.to_path_buf(),
        })),
        Ok(false) => Ok(Try::Held),
        Err(source) => Err(Error::Io {
            path: path.to_path_buf(),
            op: "flock",
            source,
        }),
    }
}

/// The `Owner` record of the LUN at `path`, if it has a readable one.
fn read_record(path: &Path) -> Option<Owner> {
    Lun::open(path, Access::ReadOnly)
        .ok()
        .and_then(|l| l.record_json(RecordType::Owner, 0).ok().flatten())
}

/// Who holds the lock of the LUN at `path`, read from its `Owner` record.
/// Only meaningful while the flock is held by someone.
fn holder(path: &Path) -> Probe {
    holder_of(read_record(path))
}

/// What the `Owner` record `rec` of a LUN whose lock is held says.
fn holder_of(rec: Option<Owner>) -> Probe {
    match rec {
        Some(Owner {
            owner,
            pid,
            control: Some(c),
            ..
        }) if owner == "lungate" => Probe::Gateway {
            pid,
            control: PathBuf::from(c),
        },
        Some(o) => Probe::Busy {
            owner: o.owner,
            pid: o.pid,
        },
        None => Probe::Busy {
            owner: String::new(),
            pid: 0,
        },
    }
}

/// Is the LUN at `path` free, served by a gateway, or held by something
/// else? Takes the lock for an instant when it is free, so a concurrent
/// [`lock`] may fail in that window (it reports the LUN busy; retry).
pub fn probe(path: &Path) -> Result<Probe> {
    Ok(match try_lock(path)? {
        Ok(_lock) => Probe::Free,
        Err(held) => held,
    })
}

/// [`probe`], with the `Owner` record the holder wrote (`None` when the
/// lock is free or the holder left no readable record): the record's own
/// fields (host, start time) for a caller that reports them.
pub fn probe_record(path: &Path) -> Result<(Probe, Option<Owner>)> {
    Ok(match try_flock(path)? {
        Try::Got(_lock) => (Probe::Free, None),
        Try::Held => {
            let rec = read_record(path);
            (holder_of(rec.clone()), rec)
        }
    })
}

/// Take the flock of the LUN at `path` if it is free, or say who holds it
/// (never [`Probe::Free`]): one attempt, so nothing can take the lock
/// between a probe and the lock.
pub fn try_lock(path: &Path) -> Result<Result<FileLock, Probe>> {
    Ok(match try_flock(path)? {
        Try::Got(l) => Ok(l),
        Try::Held => Err(holder(path)),
    })
}

/// The error for a LUN whose lock is held: who holds it, and where (the
/// host from its `Owner` record).
pub fn busy_error(path: &Path, p: &Probe) -> Error {
    let lun = path.display().to_string();
    let host = || read_record(path).map_or_else(|| "?".to_string(), |o| o.host);
    match p {
        Probe::Gateway { pid, .. } => Error::Owned {
            lun,
            owner: "lungate".into(),
            pid: *pid,
            host: host(),
        },
        Probe::Busy { owner, pid } if *pid != 0 => Error::Owned {
            lun,
            owner: owner.clone(),
            pid: *pid,
            host: host(),
        },
        _ => Error::Locked { lun },
    }
}

/// Take the flock of the LUN at `path` without waiting (no record). What
/// `lunctl` holds while it edits a LUN directly.
pub fn lock(path: &Path) -> Result<FileLock> {
    match try_flock(path)? {
        Try::Got(l) => Ok(l),
        Try::Held => Err(busy_error(path, &holder(path))),
    }
}

/// The lock plus the `Owner` record: what a gateway holds while it serves a
/// LUN. The record is written through the caller's [`Lun`] (its volume: one
/// volume per LUN per process), so changing it needs that `Lun` again:
/// [`OwnerGuard::rewrite`] and [`OwnerGuard::release`]. Dropping the guard
/// releases the lock but leaves the record, as a crash does; the record
/// alone proves nothing.
#[derive(Debug)]
pub struct OwnerGuard {
    lock: FileLock,
    record: Owner,
}

impl OwnerGuard {
    pub fn record(&self) -> &Owner {
        &self.record
    }

    pub fn path(&self) -> &Path {
        self.lock.path()
    }

    /// Write the record again (a revert restores older state records).
    pub fn rewrite(&self, lun: &mut Lun) -> Result<()> {
        write_record(lun, Some(&self.record))
    }

    /// Clear the record, then release the lock.
    pub fn release(self, lun: &mut Lun) -> Result<()> {
        let r = write_record(lun, None);
        drop(self.lock);
        r
    }
}

/// Write (`Some`) or remove (`None`) the `Owner` record.
fn write_record(lun: &mut Lun, rec: Option<&Owner>) -> Result<()> {
    match rec {
        Some(r) => lun.put_records(&[(
            RecordType::Owner,
            0,
            serde_json::to_vec(r).expect("owner record serialises"),
        )])?,
        None => {
            lun.remove_record(RecordType::Owner, 0)?;
        }
    }
    Ok(())
}

/// Take the lock of `lun` and write the `Owner` record (`owner`, this host,
/// this PID, now, `control`) through it.
pub fn acquire(lun: &mut Lun, owner: &str, control: Option<&Path>) -> Result<OwnerGuard> {
    // An RBD LUN opened read-write already holds the image's exclusive
    // lock on its own handle (a probe through another handle would find it
    // held, by us).
    let lock = if lun.is_rbd() && lun.access() == Access::ReadWrite {
        FileLock {
            file: None,
            path: lun.path().to_path_buf(),
        }
    } else {
        lock(lun.path())?
    };
    claim(lock, lun, owner, control)
}

/// [`acquire`] with a lock the caller took (with [`lock`]) before it opened
/// `lun`, so nothing opened the LUN read-write without holding it.
pub fn claim(
    lock: FileLock,
    lun: &mut Lun,
    owner: &str,
    control: Option<&Path>,
) -> Result<OwnerGuard> {
    let record = Owner {
        owner: owner.to_string(),
        host: hostname(),
        pid: std::process::id(),
        since: now(),
        control: control.map(|c| c.display().to_string()),
    };
    write_record(lun, Some(&record))?;
    Ok(OwnerGuard { lock, record })
}

/// This machine's host name ("?" when it cannot be read).
pub fn hostname() -> String {
    lungate_block::sys::hostname()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{Layout, MIB};
    use crate::lun::CreateSpec;
    use std::process::{Command, Stdio};

    fn make(dir: &Path, layout: Layout) -> PathBuf {
        let p = dir.join(format!("{layout}.lun"));
        Lun::create(
            &p,
            &CreateSpec {
                name: "o".into(),
                disks: vec![2 * MIB],
                memory: 0,
                vcpus: 1,
                layout,
                cluster_size: 0,
                checksums: false,
            },
        )
        .unwrap();
        p
    }

    fn owner_record(p: &Path) -> Option<Owner> {
        Lun::open(p, Access::ReadOnly)
            .unwrap()
            .record_json(RecordType::Owner, 0)
            .unwrap()
    }

    #[test]
    fn second_descriptor_is_refused_while_the_first_holds_the_lock() {
        let d = tempfile::tempdir().unwrap();
        for layout in [Layout::Offset, Layout::Truncate] {
            let p = make(d.path(), layout);
            assert_eq!(probe(&p).unwrap(), Probe::Free);
            let a = lock(&p).unwrap();
            let e = lock(&p).unwrap_err();
            assert!(matches!(e, Error::Locked { .. }), "{e}");
            assert!(matches!(probe(&p).unwrap(), Probe::Busy { pid: 0, .. }));
            drop(a);
            assert_eq!(probe(&p).unwrap(), Probe::Free);
            let _b = lock(&p).unwrap();
        }
    }

    #[test]
    fn acquire_writes_the_record_and_release_clears_it() {
        let d = tempfile::tempdir().unwrap();
        let p = make(d.path(), Layout::Offset);
        let mut lun = Lun::open(&p, Access::ReadWrite).unwrap();
        let sock = d.path().join("ctl.sock");
        let g = acquire(&mut lun, "lungate", Some(&sock)).unwrap();
        let rec = owner_record(&p).unwrap();
        assert_eq!(rec.pid, std::process::id());
        assert_eq!(rec.control.as_deref(), Some(sock.to_str().unwrap()));
        assert_eq!(
            probe(&p).unwrap(),
            Probe::Gateway {
                pid: std::process::id(),
                control: sock.clone()
            }
        );
        let e = lock(&p).unwrap_err().to_string();
        assert!(
            e.contains(&format!("owned by PID {} (lungate)", std::process::id()))
                && e.contains("stop it or use its control API"),
            "{e}"
        );
        g.rewrite(&mut lun).unwrap();
        g.release(&mut lun).unwrap();
        assert_eq!(owner_record(&p), None);
        assert_eq!(probe(&p).unwrap(), Probe::Free);
        // Something other than a gateway (no control socket) is just busy.
        let g = acquire(&mut lun, "vmm-shim", None).unwrap();
        match probe(&p).unwrap() {
            Probe::Busy { owner, pid, .. } => {
                assert_eq!((owner.as_str(), pid), ("vmm-shim", std::process::id()))
            }
            other => panic!("{other:?}"),
        }
        // Dropped without release: the lock goes, the record stays (as
        // after a crash) and is ignored.
        drop(g);
        assert_eq!(probe(&p).unwrap(), Probe::Free);
        assert_eq!(owner_record(&p).map(|o| o.owner), Some("vmm-shim".into()));
    }

    #[test]
    fn old_records_without_control_still_decode() {
        let o: Owner =
            serde_json::from_str(r#"{"owner":"x","host":"h","pid":3,"since":4}"#).unwrap();
        assert_eq!(o.control, None);
    }

    /// Another process holds the lock; SIGKILL releases it even though its
    /// record (written by us on its behalf) stays behind.
    #[test]
    fn child_process_lock_is_seen_and_released_by_sigkill() {
        let d = tempfile::tempdir().unwrap();
        let p = make(d.path(), Layout::Truncate);
        // The shell locks its own descriptor with flock(1) and becomes
        // `sleep`, so the child PID is the one holding the lock.
        let mut child = Command::new("sh")
            .args(["-c", "exec 9<\"$0\" && flock -n 9 && exec sleep 60"])
            .arg(&p)
            .stdout(Stdio::null())
            .spawn()
            .expect("sh and flock(1) from util-linux");
        let mut held = false;
        for _ in 0..200 {
            if probe(&p).unwrap() != Probe::Free {
                held = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(held, "child never took the lock");
        // A record left by whoever holds it names it in the error.
        write_record(
            &mut Lun::open(&p, Access::ReadWrite).unwrap(),
            Some(&Owner {
                owner: "lungate".into(),
                host: "elsewhere".into(),
                pid: child.id(),
                since: 1,
                control: None,
            }),
        )
        .unwrap();
        let e = lock(&p).unwrap_err().to_string();
        assert!(
            e.contains(&format!(
                "owned by PID {} (lungate) on elsewhere",
                child.id()
            )),
            "{e}"
        );
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(probe(&p).unwrap(), Probe::Free, "stale record is ignored");
        let _l = lock(&p).unwrap();
    }
}
