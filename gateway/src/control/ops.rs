//! The LUN operations the control API serves, one function each. Every
//! operation works on the LUN's whole consistency group: the LUN and the
//! secondary-disk LUNs its state region lists (`lun_manager::group`), all
//! of which this gateway serves. The group is built from handles that share
//! each served LUN's one volume ([`Lun::share`]), never a second volume.
//!
//! Snapshot and revert switch the layers guests read and write, so their
//! switch runs inside a live switch: every member's gate is paused
//! (in-flight requests drained, new ones parked), the layers switch in
//! memory, the gates reopen and parked requests run in arrival order. What
//! can be made ahead (the next live delta, the intent) is made before the
//! pause, and the durable commit comes after it (docs/volumes.md,
//! "Snapshots while guests run"). Tree operations of a group
//! are serialised by each member's maintenance lock, taken in one global
//! order (the LUN files' canonical paths) before any pause, so two
//! operations never deadlock and a waiting one never holds guests paused.
//! Synchronous library calls run on tokio's blocking pool.

use std::io::Cursor;
use std::path::PathBuf;
use std::sync::Arc;

use lun_manager::group::Group;
use lungate_block::volume::{Change, LayerUsage, SnapshotInfo};

use crate::registry::Registry;
use crate::served::{own, ServedLun};

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

impl From<lun_manager::Error> for OpError {
    fn from(e: lun_manager::Error) -> Self {
        use lun_manager::Error as E;
        match e {
            E::NoSnapshot(_) => OpError::NotFound(e.to_string()),
            E::SnapshotExists(_) | E::Exists { .. } | E::NameTaken { .. } | E::ReadOnly { .. } => {
                OpError::Conflict(e.to_string())
            }
            E::Invalid(_) | E::OutOfBounds { .. } => OpError::BadRequest(e.to_string()),
            other => OpError::Internal(other.to_string()),
        }
    }
}

pub type OpResult<T> = Result<T, OpError>;

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

/// The served LUNs of `l`'s group: `l` first, then its secondaries in the
/// order its state region lists them.
pub(crate) fn members(reg: &Registry, l: &Arc<ServedLun>) -> OpResult<Vec<Arc<ServedLun>>> {
    let mut h = l.lun.share();
    // A revert may have changed the secondary list since the LUN was opened.
    h.reload_state()?;
    let mut out = vec![l.clone()];
    for r in h.secondaries()?.disks {
        let m = reg
            .find(&r.lun_uuid.to_string())
            .ok_or_else(|| OpError::Conflict(unserved_secondary(l.lun.path(), l.lun.name(), &r)))?;
        out.push(m);
    }
    Ok(out)
}

/// Why a VM's secondary disk is not in this gateway's registry, as far as
/// the pool tells: another gateway (or tool) holds it, it is missing, or
/// this gateway simply does not serve it.
fn unserved_secondary(
    primary: &std::path::Path,
    vm: &str,
    r: &lungate_api::records::SecondaryRef,
) -> String {
    use lun_manager::owner::{self, Probe};
    let what = format!("{vm}: its secondary disk {} ({})", r.name, r.lun_uuid);
    let path = match lun_manager::group::locate_secondary(primary, r) {
        Ok(p) => p,
        Err(e) => {
            return format!("{what} is not in the VM's pool ({e}); attach it again or restore it")
        }
    };
    let here = std::process::id();
    match owner::probe(&path) {
        Ok(Probe::Gateway { pid, control }) if pid != here => format!(
            "{what} at {} is served by another lungate (PID {pid}, control API {}); \
             a VM's disks change together, so one gateway must serve all of them \
             (a group cannot span gateways yet): \
             stop that gateway's export of it and serve the VM's pool from one gateway",
            path.display(),
            control.display()
        ),
        Ok(Probe::Busy { owner, pid }) => format!(
            "{what} at {} is held by {} (PID {pid}); retry once it lets go",
            path.display(),
            if owner.is_empty() { "another process" } else { owner.as_str() }
        ),
        _ => format!(
            "{what} at {} is not served by this gateway (it may be damaged: see the \
             gateway's log or lunctl inspect); serve its pool too so the VM's disks change together",
            path.display()
        ),
    }
}

/// The group over `ms` (handles sharing their volumes). Building it finishes
/// or undoes an operation a crash interrupted; when that was a revert, the
/// snapshot's state records came back with its owner record (another
/// gateway's, or none), so the LUNs are claimed again.
fn group_of(ms: &[Arc<ServedLun>]) -> OpResult<Group> {
    let g = Group::from_members(ms.iter().map(|m| m.lun.share()).collect())?;
    if g.recovered_revert() {
        reclaim(ms, "recovery");
    }
    Ok(g)
}

/// Write this gateway's owner record into every member again (a revert
/// brought back the snapshot's).
fn reclaim(ms: &[Arc<ServedLun>], after: &str) {
    for m in ms {
        if let Err(e) = m.reassert_owner() {
            tracing::warn!(lun = %m.lun.name(), "owner record not rewritten after {after}: {e}");
        }
    }
}

/// Every member's maintenance lock, taken in the one global order (the
/// canonical paths, each LUN once) so two operations never deadlock; the
/// members in that order and the held locks.
async fn lock_in_order(
    ms: &[Arc<ServedLun>],
) -> (Vec<&Arc<ServedLun>>, Vec<tokio::sync::MutexGuard<'_, ()>>) {
    let mut order: Vec<&Arc<ServedLun>> = ms.iter().collect();
    order.sort_by(|a, b| a.key.cmp(&b.key));
    order.dedup_by(|a, b| a.key == b.key);
    let mut held = Vec::with_capacity(order.len());
    for m in &order {
        held.push(m.maintenance.lock().await);
    }
    (order, held)
}

/// Run `op` on the group of `l`, holding every member's maintenance lock
/// (guests keep running: operations that switch layers, snapshot and
/// revert, run their own phases around the pause).
async fn with_group<T: Send + 'static>(
    reg: &Registry,
    l: &Arc<ServedLun>,
    op: impl FnOnce(&mut Group) -> OpResult<T> + Send + 'static,
) -> OpResult<T> {
    let ms = members(reg, l)?;
    let (_order, held) = lock_in_order(&ms).await;
    let group_ms = ms.clone();
    let r = blocking(move || {
        let mut g = group_of(&group_ms)?;
        op(&mut g)
    })
    .await;
    drop(held);
    r
}

/// Snapshot `name` of the VM; returns it and the pause in µs.
pub async fn snapshot(
    reg: &Registry,
    l: &Arc<ServedLun>,
    name: String,
    description: String,
) -> OpResult<(SnapshotInfo, u64)> {
    writable(l)?;
    // Refuse the obvious before stopping anyone's I/O; the group checks again.
    lun_manager::format::validate_name(&name).map_err(OpError::BadRequest)?;
    if l.volume().snapshots().iter().any(|s| s.name == name) {
        return Err(OpError::Conflict(format!(
            "a snapshot named {name:?} already exists"
        )));
    }
    // The durable work is out of the pause: every member flushes and
    // makes its next live delta before the gates close, switches in memory
    // while they are closed, and commits after they open (a flush that
    // comes meanwhile waits for that commit).
    let ms = members(reg, l)?;
    let (order, held) = lock_in_order(&ms).await;
    let group_ms = ms.clone();
    let n = name.clone();
    let g = blocking(move || {
        let g = group_of(&group_ms)?;
        g.prepare_snapshot(&n)?;
        Ok(g)
    })
    .await?;
    let mut paused = Vec::new();
    for m in &order {
        paused.push(m.pause().await);
    }
    let n = name.clone();
    let switched = blocking(move || {
        let s = g.switch_snapshot(&n, &description);
        Ok((g, s))
    })
    .await;
    let us = paused.into_iter().map(|p| p.resume()).max().unwrap_or(0);
    let (g, s) = switched?;
    let info = blocking(move || Ok(g.finish_snapshot(&name, s)?)).await?;
    drop(held);
    Ok((info, us))
}

/// The LUN's snapshots with the sizes each had (as offline `lunctl
/// snapshots` shows them).
pub async fn snapshots(
    _reg: &Registry,
    l: &Arc<ServedLun>,
) -> OpResult<Vec<lungate_api::types::SnapshotInfo>> {
    Ok(l.lun.snapshot_list()?)
}

/// Revert the VM to snapshot `name`; returns the pause in µs.
pub async fn revert(reg: &Registry, l: &Arc<ServedLun>, name: String) -> OpResult<u64> {
    writable(l)?;
    if !l.volume().snapshots().iter().any(|s| s.name == name) {
        return Err(OpError::NotFound(format!("no snapshot named {name:?}")));
    }
    // As for a snapshot: every member makes its next live delta (on the
    // snapshot's layer) and the intent is written before the gates close;
    // the switch is in memory; the manifests are committed after the
    // gates open (a flush that comes meanwhile waits for that commit).
    let ms = members(reg, l)?;
    let (order, held) = lock_in_order(&ms).await;
    let group_ms = ms.clone();
    let (g, p) = blocking(move || {
        let g = group_of(&group_ms)?;
        let p = g.prepare_revert(&name)?;
        Ok((g, p))
    })
    .await?;
    let mut paused = Vec::new();
    for m in &order {
        paused.push(m.pause().await);
    }
    let switched = blocking(move || {
        let s = g.switch_revert(p);
        Ok((g, s))
    })
    .await;
    let us = paused.into_iter().map(|p| p.resume()).max().unwrap_or(0);
    let (mut g, s) = switched?;
    let group_ms = ms.clone();
    let r = blocking(move || {
        let r = g.finish_revert(s);
        // The snapshot's state records came back, this gateway's owner
        // record with them (or none): claim the LUNs again, also when a
        // member failed and others were reverted.
        reclaim(&group_ms, "revert");
        Ok(r?)
    })
    .await;
    drop(held);
    r.map(|()| us)
}

pub async fn delete_snapshot(reg: &Registry, l: &Arc<ServedLun>, name: String) -> OpResult<()> {
    writable(l)?;
    with_group(reg, l, move |g| Ok(g.delete_snapshot(&name)?)).await
}

/// What a clone produced.
pub struct Cloned {
    pub name: String,
    pub path: PathBuf,
    pub uuid: uuid::Uuid,
    pub exports: Vec<String>,
}

/// Clone snapshot `snap` of the VM as a new VM `new_name` in the same
/// directory (new LUN UUIDs, names and disk IDs; secondaries cloned too),
/// and serve it at once.
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
    if !l.volume().snapshots().iter().any(|s| s.name == snap) {
        return Err(OpError::NotFound(format!("no snapshot named {snap:?}")));
    }
    // With a coordinator, the new images are this gateway's before they
    // exist, so no other gateway takes one over half made.
    let pool = lun_manager::backing::pool_of(l.lun.path());
    let mut names = vec![new_name.clone()];
    if let Ok(s) = l.lun.secondaries() {
        names.extend(s.disks.iter().map(|d| format!("{new_name}-{}", d.name)));
    }
    let paths: Vec<PathBuf> = names
        .iter()
        .map(|n| lun_manager::pool::lun_path(&pool, n))
        .collect();
    crate::coordinator::preclaim(&paths)
        .await
        .map_err(OpError::Conflict)?;
    // The clone reads the snapshot, which nothing changes: no pause needed.
    let made = with_group(reg, l, move |g| {
        Ok(g.clone(&snap, &new_name)?.into_members())
    })
    .await;
    let clones = match made {
        Ok(m) => m,
        Err(e) => {
            crate::coordinator::unclaim(&paths).await;
            return Err(e);
        }
    };
    let control = reg.control.clone();
    let mut served = Vec::new();
    for mut c in clones {
        let o = own(&mut c, control.as_deref()).map_err(|e| OpError::Internal(e.to_string()))?;
        served.push(Arc::new(ServedLun::from_parts(
            c,
            reg.read_only,
            o,
            reg.switch_stats.clone(),
        )));
    }
    let primary = served[0].clone();
    let mut exports = Vec::new();
    for s in served {
        let names = reg.add(s).map_err(|e| OpError::Internal(e.to_string()))?;
        if exports.is_empty() {
            exports = names;
        }
    }
    tracing::info!(lun = %primary.lun.name(), "clone made and exported");
    Ok(Cloned {
        name: primary.lun.name().to_string(),
        path: primary.lun.path().to_path_buf(),
        uuid: primary.lun.uuid(),
        exports,
    })
}

/// Copy every cluster the VM's disks read through shared layers into their
/// own (synchronous; guests keep running).
pub async fn flatten(reg: &Registry, l: &Arc<ServedLun>) -> OpResult<()> {
    writable(l)?;
    with_group(reg, l, |g| Ok(g.flatten(|_, _| {})?)).await
}

pub async fn diff(
    reg: &Registry,
    l: &Arc<ServedLun>,
    from: String,
    to: Option<String>,
) -> OpResult<Vec<Change>> {
    with_group(reg, l, move |g| Ok(g.diff(&from, to.as_deref())?)).await
}

/// The diff file from `from` to `to` (the live VM if `None`).
pub async fn diff_file(
    reg: &Registry,
    l: &Arc<ServedLun>,
    from: String,
    to: Option<String>,
) -> OpResult<Vec<u8>> {
    with_group(reg, l, move |g| {
        let mut out = Vec::new();
        g.write_diff(&from, to.as_deref(), &mut out)?;
        Ok(out)
    })
    .await
}

/// Verify a whole diff file, then write it to the live VM. Like any other
/// writer's, its writes interleave with the guests'; no pause (a large diff
/// would hold guests for its whole verification).
pub async fn apply_diff(reg: &Registry, l: &Arc<ServedLun>, body: bytes::Bytes) -> OpResult<()> {
    writable(l)?;
    with_group(reg, l, move |g| {
        g.apply_diff(&mut Cursor::new(&body[..]))?;
        Ok(())
    })
    .await
    .map(|_| ())
}

/// Check every data checksum of the VM (all members) while guests run;
/// other operations on the LUN wait meanwhile (the maintenance lock).
pub async fn scrub(reg: &Registry, l: &Arc<ServedLun>) -> OpResult<lungate_api::types::Scrub> {
    with_group(reg, l, |g| {
        Ok(g.scrub(&mut lungate_block::progress::silent())?)
    })
    .await
}

pub async fn usage(reg: &Registry, l: &Arc<ServedLun>) -> OpResult<Vec<LayerUsage>> {
    with_group(reg, l, |g| Ok(g.usage())).await
}

/// Before serving: finish or undo every group operation a crash
/// interrupted, so guests never see a half-made snapshot or revert (a
/// revert finished here claims its LUNs again, see [`group_of`]).
pub fn recover(reg: &Registry) {
    for l in reg.luns() {
        if l.read_only {
            continue;
        }
        if let Err(e) = members(reg, &l).and_then(|ms| group_of(&ms)) {
            tracing::warn!(lun = %l.lun.name(), "consistency group not checked: {e}");
        }
    }
}
