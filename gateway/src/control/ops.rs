//! The LUN operations the control API serves, one function each, on the
//! served LUN's volume. Snapshot, revert and clone run inside a live
//! switch: the LUN's gate is paused (in-flight requests drained, new ones
//! parked), the operation runs, the gate reopens in arrival order.
//!
//! Each function works on the primary LUN only until branch vol's
//! `lun_manager::group::Group` lands; each is marked `// MERGE: use Group`
//! where the group call (over primary + secondaries, one commit point)
//! replaces the volume call, and where every member's gate must be paused.
//! Synchronous volume calls run on tokio's blocking pool.

use std::path::PathBuf;
use std::sync::Arc;

use lun_manager::volume::{self, Change, LayerUsage, SnapshotInfo, VolumeConfig};
use lun_manager::{CreateSpec, Lun};

use crate::registry::Registry;
use crate::served::{OwnerLock, ServeError, ServedLun};

/// Why an operation failed; the HTTP layer maps each kind to a status.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Internal(String),
}

impl From<volume::Error> for OpError {
    fn from(e: volume::Error) -> Self {
        match e {
            volume::Error::NoSnapshot(_) => OpError::NotFound(e.to_string()),
            volume::Error::SnapshotExists(_) => OpError::Conflict(e.to_string()),
            volume::Error::Invalid(_)
            | volume::Error::OutOfBounds { .. }
            | volume::Error::Protected { .. } => OpError::BadRequest(e.to_string()),
            other => OpError::Internal(other.to_string()),
        }
    }
}

pub type OpResult<T> = Result<T, OpError>;

/// `POOL/NAME.lun` → `POOL/NAME.layers` (the volume's layers directory).
fn layers_dir(lun: &std::path::Path) -> PathBuf {
    lun.with_extension("layers")
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> OpResult<T> + Send + 'static,
) -> OpResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| OpError::Internal(format!("operation task failed: {e}")))?
}

fn writable(l: &ServedLun) -> OpResult<()> {
    if l.read_only {
        return Err(OpError::Conflict(format!(
            "LUN {} is served read-only",
            l.lun.name()
        )));
    }
    Ok(())
}

/// Snapshot `name` of the LUN; returns it and the pause in µs.
pub async fn snapshot(
    l: &Arc<ServedLun>,
    name: String,
    description: String,
) -> OpResult<(SnapshotInfo, u64)> {
    writable(l)?;
    // Refuse the obvious before stopping anyone's I/O; the volume checks again.
    if name.is_empty() {
        return Err(OpError::BadRequest("snapshot name is empty".into()));
    }
    if l.volume.snapshots().iter().any(|s| s.name == name) {
        return Err(volume::Error::SnapshotExists(name).into());
    }
    let _m = l.maintenance.lock().await;
    // MERGE: use Group (pause every member's gate, then Group::snapshot)
    let paused = l.pause().await;
    let v = l.volume.clone();
    let r = blocking(move || Ok(v.snapshot(&name, &description)?)).await;
    l.refresh_plain();
    let us = paused.resume();
    Ok((r?, us))
}

pub async fn snapshots(l: &Arc<ServedLun>) -> OpResult<Vec<SnapshotInfo>> {
    // MERGE: use Group
    Ok(l.volume.snapshots())
}

/// Revert the LUN to snapshot `name`; returns the pause in µs.
pub async fn revert(l: &Arc<ServedLun>, name: String) -> OpResult<u64> {
    writable(l)?;
    if !l.volume.snapshots().iter().any(|s| s.name == name) {
        return Err(volume::Error::NoSnapshot(name).into());
    }
    // MERGE: use Group (pause every member; Group::revert); then re-write the
    // Owner record (owner::acquire), which the revert rolled back.
    let _m = l.maintenance.lock().await;
    let paused = l.pause().await;
    let v = l.volume.clone();
    let r = blocking(move || Ok(v.revert(&name)?)).await;
    l.refresh_plain();
    let us = paused.resume();
    r.map(|()| us)
}

pub async fn delete_snapshot(l: &Arc<ServedLun>, name: String) -> OpResult<()> {
    writable(l)?;
    let _m = l.maintenance.lock().await;
    // MERGE: use Group
    let v = l.volume.clone();
    blocking(move || Ok(v.delete_snapshot(&name)?)).await
}

/// What a clone produced.
pub struct Cloned {
    pub name: String,
    pub path: PathBuf,
    pub uuid: String,
    pub exports: Vec<String>,
}

/// Clone snapshot `snap` of the LUN as a new LUN `new_name` in the same
/// directory, and serve it at once.
///
/// Without `Group` this creates `NEW_NAME.lun` with the source's layout,
/// disk sizes, memory and vCPUs (new LUN UUID, new name in the label) and
/// points its volume at the snapshot. Still missing (Group::clone does it):
/// the state region comes from the snapshot, so its Identity record keeps
/// the source's disk IDs, and secondaries are not cloned.
pub async fn clone(
    reg: &Arc<Registry>,
    l: &Arc<ServedLun>,
    snap: String,
    new_name: String,
) -> OpResult<Cloned> {
    writable(l)?;
    lun_manager::format::validate_name(&new_name).map_err(OpError::BadRequest)?;
    if reg.find(&new_name).is_some() {
        return Err(OpError::Conflict(format!(
            "a LUN named {new_name:?} is already served"
        )));
    }
    let dir = l
        .lun
        .path()
        .parent()
        .map(|p| p.to_path_buf())
        .unwrap_or_else(|| PathBuf::from("."));
    let path = lun_manager::pool::lun_path(&dir, &new_name);
    if path.exists() || layers_dir(&path).exists() {
        return Err(OpError::Conflict(format!(
            "{} already exists",
            path.display()
        )));
    }
    if !l.volume.snapshots().iter().any(|s| s.name == snap) {
        return Err(OpError::NotFound(format!("no snapshot named {snap:?}")));
    }
    let src = l.lun.clone();
    let hw = src
        .hardware()
        .map_err(|e| OpError::Internal(e.to_string()))?;
    let spec = CreateSpec {
        name: new_name.clone(),
        disks: src.disks().iter().map(|r| r.length).collect(),
        memory: hw.memory_bytes,
        vcpus: hw.vcpus,
        layout: src.layout(),
    };
    // MERGE: use Group (Group::clone: identity records, secondaries)
    let p2 = path.clone();
    let src_size = src.label().lun_size;
    // A failed create leaves nothing of ours behind (and an existing file is
    // someone else's): no cleanup on this path.
    let target = blocking(move || {
        Lun::create(&p2, &spec).map_err(|e| match e {
            lun_manager::Error::Exists { .. } => OpError::Conflict(e.to_string()),
            e => OpError::BadRequest(e.to_string()),
        })
    })
    .await?;
    let cleanup = |p: &PathBuf| {
        let _ = std::fs::remove_file(p);
        let _ = std::fs::remove_dir_all(layers_dir(p));
    };
    if target.label().lun_size != src_size {
        let msg = format!(
            "new LUN is {} bytes, the source {src_size}: cannot clone",
            target.label().lun_size
        );
        drop(target);
        cleanup(&path);
        return Err(OpError::Internal(msg));
    }
    // MERGE: owner::acquire
    let owner = match OwnerLock::acquire(&path, true) {
        Ok(o) => o,
        Err(e @ ServeError::Busy { .. }) => return Err(OpError::Conflict(e.to_string())),
        Err(e) => {
            drop(target);
            cleanup(&path);
            return Err(OpError::Internal(e.to_string()));
        }
    };
    let m = l.maintenance.lock().await;
    let paused = l.pause().await;
    let v = l.volume.clone();
    let cfg = VolumeConfig::for_lun(&target, Default::default());
    let r = blocking(move || Ok(v.clone_to(&snap, cfg)?)).await;
    let us = paused.resume();
    drop(m);
    let vol = match r {
        Ok(v) => Arc::new(v),
        Err(e) => {
            drop(owner);
            drop(target);
            cleanup(&path);
            return Err(e);
        }
    };
    tracing::info!(lun = %new_name, pause_us = us, "clone made");
    let uuid = target.uuid().to_string();
    let served = Arc::new(ServedLun::from_parts(
        Arc::new(target),
        vol,
        reg.read_only,
        owner,
        reg.switch_stats.clone(),
    ));
    let exports = reg
        .add(served)
        .map_err(|e| OpError::Internal(e.to_string()))?;
    Ok(Cloned {
        name: new_name,
        path,
        uuid,
        exports,
    })
}

/// Copy every cluster into the live layer (synchronous).
pub async fn flatten(l: &Arc<ServedLun>) -> OpResult<()> {
    writable(l)?;
    let _m = l.maintenance.lock().await;
    // MERGE: use Group
    let v = l.volume.clone();
    blocking(move || Ok(v.flatten(|_, _| {})?)).await
}

pub async fn diff(l: &Arc<ServedLun>, from: String, to: Option<String>) -> OpResult<Vec<Change>> {
    // MERGE: use Group
    let v = l.volume.clone();
    blocking(move || Ok(v.diff(&from, to.as_deref())?)).await
}

/// The diff file from `from` to `to` (the live volume if `None`).
pub async fn diff_file(l: &Arc<ServedLun>, from: String, to: Option<String>) -> OpResult<Vec<u8>> {
    // MERGE: use Group (Group::write_diff)
    let v = l.volume.clone();
    let uuid = l.lun.uuid();
    blocking(move || {
        let mut out = Vec::new();
        super::difffile::write(&v, uuid, &from, to.as_deref(), &mut out)?;
        Ok(out)
    })
    .await
}

/// Verify a whole diff file, then write it to the live volume.
pub async fn apply_diff(l: &Arc<ServedLun>, body: bytes::Bytes) -> OpResult<()> {
    writable(l)?;
    // MERGE: use Group (Group::apply_diff)
    let v = l.volume.clone();
    blocking(move || super::difffile::apply(&v, &body)).await
}

pub async fn usage(l: &Arc<ServedLun>) -> OpResult<Vec<LayerUsage>> {
    // MERGE: use Group
    Ok(l.volume.usage())
}
