//! A VM's consistency group: its primary LUN plus the secondary-disk LUNs
//! its state region lists (found by LUN UUID among the `*.lun` files of the
//! primary's directory). Snapshot, revert, delete, clone, flatten, diff and
//! apply-diff act on every member under one snapshot name, so a VM's disks
//! and state always move together.
//!
//! Crash safety. Before a multi-member operation the group writes an
//! intent file, `POOL/.NAME.group-op` (JSON, fsynced), and removes it when
//! done; a read-write [`Group::open`] that finds one finishes or undoes the
//! operation before anything else:
//!
//! * snapshot: secondaries first, the primary last — the primary's manifest
//!   commit is the commit point. Recovery deletes the snapshot from any
//!   secondary when the primary lacks it, so no half-made snapshot is seen.
//! * revert: the intent names each member's live layer after the revert
//!   (made ahead, before the pause); recovery reverts every member not on
//!   it yet (its revert was never committed, so nothing written since was
//!   flushed) and leaves the others, which may hold writes flushed after
//!   the switch.
//! * delete: the primary first; recovery deletes the name from every member
//!   still holding it.
//! * clone: secondaries' clones first, the primary's clone last (its label
//!   write is the commit point); recovery removes every listed clone file
//!   when the primary's clone has no label yet.
//!
//! This module must not touch layer files itself: it calls [`Volume`] and
//! [`Lun`].

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{Error, IoContext, Result};
use crate::format::state::{SecondaryDisks, SecondaryRef};
use crate::lun::{Access, Lun};
use crate::progress::Progress;
use lungate_block::volume::{self, Change, LayerUsage, SnapshotInfo, Volume};

/// What [`Group::switch_snapshot`] did: the members (by index) that
/// switched, and the primary's snapshot or the first error.
pub struct Switched {
    done: Vec<usize>,
    result: std::result::Result<SnapshotInfo, volume::Error>,
}

/// A multi-member operation in progress (the intent file's body).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum Intent {
    Snapshot {
        name: String,
    },
    Revert {
        name: String,
        /// Each member's live layer after its revert (`None`: a store
        /// with its own snapshots), so recovery reverts only the members
        /// whose revert was never committed (one that was may hold writes
        /// flushed since). Empty in intents of older versions: every
        /// member is reverted again.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        tops: Vec<Option<Uuid>>,
    },
    Delete {
        name: String,
    },
    /// `members[0]` is the primary's clone (the commit point).
    Clone {
        members: Vec<CloneMember>,
    },
}

/// One LUN a clone makes: `POOL/NAME.lun` with LUN UUID `uuid`. The intent
/// holds names, never paths, so recovery can only reach files in the pool,
/// and the UUID chosen before anything is created, so recovery only removes
/// a file it can prove this clone made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CloneMember {
    name: String,
    uuid: Uuid,
}

/// What [`Group::prepare_revert`] made ready: each member's live layer
/// after the revert (see [`Intent::Revert`]).
pub struct PreparedRevert {
    name: String,
    tops: Vec<Option<Uuid>>,
}

/// What [`Group::switch_revert`] did: the members (by index) that
/// switched, the first error, and whether the revert is already durable
/// and its intent ended (a member on a store with its own snapshots
/// reverts durably at the switch, so the whole group is finished there).
pub struct RevertSwitched {
    done: Vec<usize>,
    result: std::result::Result<(), volume::Error>,
    ended: bool,
}

pub struct Group {
    /// Primary first, then secondaries in the order the state region lists.
    members: Vec<Lun>,
    access: Access,
    /// The open finished a revert a crash interrupted.
    recovered_revert: bool,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.members.iter()).finish()
    }
}

fn pool_of(path: &Path) -> PathBuf {
    crate::backing::pool_of(path)
}

/// Whether `p` is a regular file (not a symlink) directly inside `pool`.
fn in_pool(pool: &Path, p: &Path) -> bool {
    let (Some(parent), Ok(md)) = (p.parent(), p.symlink_metadata()) else {
        return false;
    };
    md.is_file()
        && matches!(
            (parent.canonicalize(), pool.canonicalize()),
            (Ok(a), Ok(b)) if a == b
        )
}

/// The metadata key of an RBD primary's intent.
const INTENT_KEY: &str = "lungate.group-op";

fn intent_path(primary: &Path) -> PathBuf {
    let stem = primary
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    pool_of(primary).join(format!(".{stem}.group-op"))
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx(dir, "fsync directory")
}

/// Where the secondary `r` of the primary LUN at `primary` lives (the same
/// search [`Group::open`] does: the path hint if it is a file of the
/// primary's pool holding that UUID, else every LUN of the pool).
pub fn locate_secondary(primary: &Path, r: &SecondaryRef) -> Result<PathBuf> {
    find_secondary(&pool_of(primary), r)
}

/// The volume ranges of `lun`'s disks, minus its protected (label) bytes:
/// what a diff's base digest covers, so a diff applies to another LUN
/// whose disks hold the same bytes (its state region, with its own
/// identity, is not compared nor written).
fn disk_ranges(lun: &Lun) -> Vec<std::ops::Range<u64>> {
    let mut r: Vec<_> = lun
        .disks()
        .iter()
        .map(|d| d.offset..d.offset.saturating_add(d.length))
        .collect();
    if lun.layout() == crate::Layout::Aligned {
        // disk0's first MiB (the guest's partition table) lives in the
        // state region's shadow area: it is disk bytes too.
        let at = lun.label().state_region().offset + crate::format::state::SHADOW_AT;
        r.push(at..at + crate::format::SHADOW_LEN);
    }
    volume::diff::clip_ranges(&r, lun.volume().protected())
}

/// Find the LUN with `uuid`: its path hint first, then every `*.lun` file
/// in `pool`.
fn find_secondary(pool: &Path, r: &SecondaryRef) -> Result<PathBuf> {
    // The hint comes from the state region, a file of the pool's own: it is
    // only followed to a regular file directly inside this pool.
    let hint = PathBuf::from(&r.path_hint);
    if !r.path_hint.is_empty()
        && in_pool(pool, &hint)
        && Lun::probe_uuid(&hint).ok() == Some(r.lun_uuid)
    {
        return Ok(hint);
    }
    let mut found = Vec::new();
    for e in std::fs::read_dir(pool).ctx(pool, "list pool")? {
        let p = e.ctx(pool, "list pool")?.path();
        if p.extension().is_some_and(|x| x == "lun") && Lun::probe_uuid(&p).ok() == Some(r.lun_uuid)
        {
            found.push(p);
        }
    }
    found.sort();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(Error::Invalid(format!(
            "secondary disk {} ({}) not found in {}",
            r.name,
            r.lun_uuid,
            pool.display()
        ))),
        _ => Err(Error::Invalid(format!(
            "secondary disk {} ({}) found more than once in {}: {}",
            r.name,
            r.lun_uuid,
            pool.display(),
            found
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

fn has_snapshot(v: &Volume, name: &str) -> bool {
    v.snapshots().iter().any(|s| s.name == name)
}

impl Group {
    /// Open `primary` and every secondary its state region lists. A
    /// read-write open first finishes or undoes an interrupted operation.
    pub fn open(primary: &Path, access: Access) -> Result<Group> {
        let p = Lun::open(primary, access)?;
        let pool = pool_of(primary);
        let mut members = Vec::new();
        let refs = p.secondaries()?;
        members.push(p);
        for r in &refs.disks {
            let path = find_secondary(&pool, r)?;
            members.push(Lun::open(&path, access)?);
        }
        let mut g = Group {
            members,
            access,
            recovered_revert: false,
        };
        if access == Access::ReadWrite {
            g.recover()?;
        }
        Ok(g)
    }

    /// A group of LUNs the caller already opened (a gateway serving them):
    /// `members[0]` is the primary, the rest must be exactly its secondaries
    /// in the order its state region lists them. A read-write group first
    /// finishes or undoes an interrupted operation, like [`Group::open`].
    pub fn from_members(members: Vec<Lun>) -> Result<Group> {
        let Some(p) = members.first() else {
            return Err(Error::Invalid("a group needs a primary LUN".into()));
        };
        let want: Vec<Uuid> = p.secondaries()?.disks.iter().map(|r| r.lun_uuid).collect();
        let got: Vec<Uuid> = members[1..].iter().map(Lun::uuid).collect();
        if want != got {
            return Err(Error::Invalid(format!(
                "{} lists secondaries {want:?}; the group was given {got:?}",
                p.name()
            )));
        }
        let access = if members.iter().all(|m| m.access() == Access::ReadWrite) {
            Access::ReadWrite
        } else {
            Access::ReadOnly
        };
        let mut g = Group {
            members,
            access,
            recovered_revert: false,
        };
        if access == Access::ReadWrite {
            g.recover()?;
        }
        Ok(g)
    }

    /// Whether opening the group finished a revert a crash interrupted:
    /// the snapshot's state records came back, its `Owner` record among
    /// them, so whoever serves the LUNs must claim them again.
    pub fn recovered_revert(&self) -> bool {
        self.recovered_revert
    }

    /// Give the members back (primary first).
    pub fn into_members(self) -> Vec<Lun> {
        self.members
    }

    /// Primary first, then the secondaries.
    pub fn members(&self) -> &[Lun] {
        &self.members
    }

    pub fn primary(&self) -> &Lun {
        &self.members[0]
    }

    fn intent_path(&self) -> PathBuf {
        intent_path(self.primary().path())
    }

    fn begin(&self, i: &Intent) -> Result<()> {
        if self.access == Access::ReadOnly {
            return Err(Error::ReadOnly {
                path: self.primary().path().to_path_buf(),
            });
        }
        let p = self.intent_path();
        let body = serde_json::to_vec(i).expect("intent serialises");
        // An RBD LUN keeps its intent in its image's metadata.
        let text = String::from_utf8_lossy(&body);
        if let Some(r) = self.primary().backing().note_set(INTENT_KEY, Some(&text)) {
            return r.ctx(&p, "record intent");
        }
        // Never through a symlink planted in the pool.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&p)
            .ctx(&p, "create intent")?;
        (&f).write_all(&body).ctx(&p, "write intent")?;
        f.sync_all().ctx(&p, "fsync intent")?;
        sync_dir(&pool_of(&p))
    }

    fn end(&self) -> Result<()> {
        let p = self.intent_path();
        if let Some(r) = self.primary().backing().note_set(INTENT_KEY, None) {
            return r.ctx(&p, "remove intent");
        }
        match std::fs::remove_file(&p) {
            Ok(()) => sync_dir(&pool_of(&p)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).ctx(&p, "remove intent"),
        }
    }

    fn reload(&mut self) -> Result<()> {
        for m in &mut self.members {
            m.reload_state()?;
        }
        Ok(())
    }

    /// Finish or undo an operation a crash interrupted (module docs).
    fn recover(&mut self) -> Result<()> {
        let p = self.intent_path();
        let mut body = Vec::new();
        let note = self.primary().backing().note_get(INTENT_KEY);
        let opened = match note {
            Some(r) => {
                match r.ctx(&p, "read intent")? {
                    Some(v) => body = v.into_bytes(),
                    None => return Ok(()),
                }
                Err(std::io::Error::from_raw_os_error(0))
            }
            None => std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&p),
        };
        match opened {
            Err(_) if !body.is_empty() => {}
            Ok(mut f) => {
                f.read_to_end(&mut body).ctx(&p, "read intent")?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                tracing::warn!(
                    "{}: a symlink, not an intent this gateway wrote; removed the link, nothing else",
                    p.display()
                );
                return self.end();
            }
            Err(e) => return Err(e).ctx(&p, "read intent"),
        }
        let intent: Intent = match serde_json::from_slice(&body) {
            Ok(i) => i,
            // A torn intent was written before the operation began; one
            // in another shape was not written by this version. Neither
            // names anything recovery could prove it made: nothing is
            // removed.
            Err(e) => {
                if !body.is_empty() {
                    tracing::warn!(
                        "{}: ignored an intent this version cannot act on ({e}); nothing removed",
                        p.display()
                    );
                }
                return self.end();
            }
        };
        tracing::warn!(
            "{}: finishing an interrupted group operation {intent:?}",
            self.primary().path().display()
        );
        match &intent {
            Intent::Snapshot { name } => {
                if !has_snapshot(self.primary().volume(), name) {
                    for m in &self.members[1..] {
                        if has_snapshot(m.volume(), name) {
                            m.volume().delete_snapshot(name)?;
                        }
                    }
                }
            }
            Intent::Revert { name, tops } => {
                for (i, m) in self.members.iter().enumerate() {
                    let committed = tops
                        .get(i)
                        .copied()
                        .flatten()
                        .is_some_and(|t| m.volume().live_layer() == Some(t));
                    if !committed && has_snapshot(m.volume(), name) {
                        m.volume().revert(name)?;
                    }
                }
                self.reload()?;
                self.recovered_revert = true;
            }
            Intent::Delete { name } => {
                for m in &self.members {
                    if has_snapshot(m.volume(), name) {
                        m.volume().delete_snapshot(name)?;
                    }
                }
            }
            Intent::Clone { members } => {
                let pool = pool_of(self.primary().path());
                let committed = members.first().is_some_and(|c| {
                    clone_path(&pool, c).is_ok_and(|p| Lun::probe_uuid(&p).ok() == Some(c.uuid))
                });
                if !committed {
                    for c in members {
                        for w in remove_clone(&pool, c)? {
                            tracing::warn!("{w}");
                        }
                    }
                }
            }
        }
        self.end()
    }

    /// Snapshot every member as `name` (secondaries first, the primary
    /// last: its commit is the group's). Returns the primary's snapshot.
    pub fn snapshot(&self, name: &str, description: &str) -> Result<SnapshotInfo> {
        self.prepare_snapshot(name)?;
        let switched = self.switch_snapshot(name, description);
        self.finish_snapshot(name, switched)
    }

    /// Phase one of a live group snapshot, before the guests are paused:
    /// refuse a name any member has, write the intent (a group of more
    /// than one), and let every member flush and make its next live delta
    /// ahead ([`lungate_block::Volume::prepare_snapshot`]).
    pub fn prepare_snapshot(&self, name: &str) -> Result<()> {
        for m in &self.members {
            if has_snapshot(m.volume(), name) {
                let e = volume::Error::SnapshotExists(name.into());
                return Err(if m.uuid() == self.primary().uuid() {
                    e.into()
                } else {
                    crate::Error::SnapshotExists(format!("{e} in secondary disk {}", m.name()))
                });
            }
        }
        // One member's snapshot is one manifest commit: nothing to finish
        // or undo after a crash, so no intent.
        let multi = self.members.len() > 1;
        if multi {
            self.begin(&Intent::Snapshot { name: name.into() })?;
        }
        for m in &self.members {
            if let Err(e) = m.volume().prepare_snapshot() {
                if multi {
                    self.end()?;
                }
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// Phase two, while the guests are paused: every member switches in
    /// memory (secondaries first, the primary last), no byte written.
    pub fn switch_snapshot(&self, name: &str, description: &str) -> Switched {
        let mut done = Vec::new();
        let mut result = Ok(None);
        for (i, m) in self
            .members
            .iter()
            .enumerate()
            .skip(1)
            .chain(self.members.iter().enumerate().take(1))
        {
            match m.volume().switch_snapshot(name, description) {
                Ok(info) => {
                    done.push(i);
                    result = Ok(Some(info));
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        Switched {
            done,
            result: result.map(|i| i.expect("the primary was switched last")),
        }
    }

    /// Phase three, after the guests go on: commit every switched member
    /// (secondaries first; the primary's commit is the group's), then end
    /// the intent. When a member failed, the members that made the
    /// snapshot delete it again.
    pub fn finish_snapshot(&self, name: &str, switched: Switched) -> Result<SnapshotInfo> {
        let mut result = switched.result;
        for &i in switched.done.iter() {
            if let Err(e) = self.members[i].volume().finish_switch() {
                if result.is_ok() {
                    result = Err(e);
                }
            }
        }
        let multi = self.members.len() > 1;
        match result {
            Ok(info) => {
                if multi {
                    self.end()?;
                }
                Ok(info)
            }
            Err(e) => {
                for &i in &switched.done {
                    let _ = self.members[i].volume().delete_snapshot(name);
                }
                if multi {
                    self.end()?;
                }
                Err(e.into())
            }
        }
    }

    /// The primary's snapshots (every member has the same names).
    pub fn snapshots(&self) -> Vec<SnapshotInfo> {
        self.primary().volume().snapshots()
    }

    fn require(&self, name: &str) -> Result<()> {
        for m in &self.members {
            if !has_snapshot(m.volume(), name) {
                return Err(Error::NoSnapshot(format!(
                    "no snapshot named {name:?} in {} ({})",
                    m.name(),
                    m.path().display()
                )));
            }
        }
        Ok(())
    }

    /// Revert every member to `name`; state records come back with the
    /// disks (the identity too, which snapshots never change). The three
    /// phases of a live group revert in one call.
    pub fn revert(&mut self, name: &str) -> Result<()> {
        let p = self.prepare_revert(name)?;
        let s = self.switch_revert(p);
        self.finish_revert(s)
    }

    /// Phase one of a live group revert, before the guests are paused:
    /// every member makes its next live delta ahead on the snapshot's
    /// layer ([`Volume::prepare_revert`]), then the intent names them (so
    /// a crash from here on finishes the revert, and recovery leaves a
    /// member whose revert was committed as it is).
    pub fn prepare_revert(&self, name: &str) -> Result<PreparedRevert> {
        self.require(name)?;
        // A snapshot taken before a resize has its regions where they were:
        // reverting to it under the grown label would misplace them.
        for m in &self.members {
            m.same_layout_as(name, "reverting to it")?;
        }
        let mut tops = Vec::with_capacity(self.members.len());
        for m in &self.members {
            tops.push(m.volume().prepare_revert(name)?);
        }
        self.begin(&Intent::Revert {
            name: name.into(),
            tops: tops.clone(),
        })?;
        Ok(PreparedRevert {
            name: name.into(),
            tops,
        })
    }

    /// Phase two, while the guests are paused: every member switches in
    /// memory (secondaries first, the primary last), no byte written. With
    /// a member on a store with its own snapshots (whose revert is durable
    /// at once), the others are committed and the intent ended here too,
    /// so no recovery reverts such a member again over writes made after.
    pub fn switch_revert(&self, p: PreparedRevert) -> RevertSwitched {
        let n = self.members.len();
        let mut done = Vec::new();
        let mut result = Ok(());
        for i in (1..n).chain(0..1) {
            match self.members[i].volume().switch_revert(&p.name) {
                Ok(()) => done.push(i),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        let mut ended = false;
        if result.is_ok() && p.tops.iter().any(Option::is_none) {
            for &i in &done {
                if let Err(e) = self.members[i].volume().finish_switch() {
                    result = Err(e);
                    break;
                }
            }
            ended = result.is_ok() && self.end().is_ok();
        }
        RevertSwitched {
            done,
            result,
            ended,
        }
    }

    /// Phase three, after the guests go on: commit every switched member
    /// (secondaries first, the primary last), read the state records back
    /// and end the intent. When a member failed, the intent stays: the
    /// next read-write open of the group finishes the revert.
    pub fn finish_revert(&mut self, s: RevertSwitched) -> Result<()> {
        let mut result = s.result;
        if !s.ended {
            for &i in &s.done {
                if let Err(e) = self.members[i].volume().finish_switch() {
                    if result.is_ok() {
                        result = Err(e);
                    }
                }
            }
        }
        result?;
        self.reload()?;
        if s.ended {
            Ok(())
        } else {
            self.end()
        }
    }

    /// Delete snapshot `name` from every member (merging layers so no
    /// other snapshot, branch or clone loses a byte).
    pub fn delete_snapshot(&self, name: &str) -> Result<()> {
        self.delete_snapshot_with(name, &mut crate::progress::silent())
    }

    /// [`Group::delete_snapshot`], reporting the merges of every member as
    /// one `merge` phase to `progress`.
    pub fn delete_snapshot_with(&self, name: &str, progress: &mut dyn Progress) -> Result<()> {
        if !has_snapshot(self.primary().volume(), name) {
            return Err(volume::Error::NoSnapshot(name.into()).into());
        }
        self.begin(&Intent::Delete { name: name.into() })?;
        let mut base = 0;
        for m in &self.members {
            if has_snapshot(m.volume(), name) {
                let mut end = base;
                m.volume().delete_snapshot_with(name, &mut |p, d, t| {
                    end = base + t;
                    progress.update(p, base + d, base + t)
                })?;
                base = end;
            }
        }
        self.end()
    }

    /// A new VM from snapshot `name`: `POOL/NEW_NAME.lun` (and, for each
    /// secondary S, `POOL/NEW_NAME-S.lun`), each with a new LUN UUID, name
    /// and disk IDs, its chain an empty delta on the snapshot (O(1) in the
    /// data), the clone's secondary references pointing at the cloned
    /// secondaries.
    pub fn clone(&self, name: &str, new_name: &str) -> Result<Group> {
        self.require(name)?;
        let pool = pool_of(self.primary().path());
        let mut paths = vec![crate::pool::lun_path(&pool, new_name)];
        let mut names = vec![new_name.to_string()];
        for m in &self.members[1..] {
            let n = format!("{new_name}-{}", m.name());
            crate::format::validate_name(&n).map_err(Error::Invalid)?;
            paths.push(crate::pool::lun_path(&pool, &n));
            names.push(n);
        }
        crate::format::validate_name(new_name).map_err(Error::Invalid)?;
        for p in &paths {
            if p.exists() || lungate_block::store::file::layers_dir(p).exists() {
                return Err(Error::Exists { path: p.clone() });
            }
        }
        for n in &names {
            if let Some(path) = crate::pool::find_vm(&pool, n)? {
                return Err(Error::NameTaken {
                    pool,
                    name: n.clone(),
                    path,
                });
            }
        }
        let uuids: Vec<Uuid> = paths.iter().map(|_| Uuid::new_v4()).collect();
        let intent: Vec<CloneMember> = names
            .iter()
            .zip(&uuids)
            .map(|(n, u)| CloneMember {
                name: n.clone(),
                uuid: *u,
            })
            .collect();
        self.begin(&Intent::Clone {
            members: intent.clone(),
        })?;
        let made = (|| {
            let mut secs = Vec::new();
            let mut refs = SecondaryDisks::default();
            for (i, m) in self.members.iter().enumerate().skip(1) {
                let c = m.clone_from_snapshot(name, &paths[i], &names[i], uuids[i], None)?;
                refs.disks.push(SecondaryRef {
                    lun_uuid: c.uuid(),
                    name: c.name().into(),
                    path_hint: paths[i]
                        .canonicalize()
                        .unwrap_or_else(|_| paths[i].clone())
                        .display()
                        .to_string(),
                    attached: crate::lun::now(),
                });
                secs.push(c);
            }
            let p = self.primary().clone_from_snapshot(
                name,
                &paths[0],
                new_name,
                uuids[0],
                Some(refs),
            )?;
            let mut members = vec![p];
            members.extend(secs);
            Ok(Group {
                members,
                access: Access::ReadWrite,
                recovered_revert: false,
            })
        })();
        match made {
            Ok(g) => {
                self.end()?;
                Ok(g)
            }
            Err(e) => {
                for c in &intent {
                    match remove_clone(&pool, c) {
                        Ok(w) => w.iter().for_each(|w| tracing::warn!("{w}")),
                        Err(e) => tracing::warn!("clone {}: not cleaned up: {e}", c.name),
                    }
                }
                self.end()?;
                Err(e)
            }
        }
    }

    /// Flatten every member (each resumable after a crash: calling again
    /// continues where it stopped). `progress(done, total)` counts clusters
    /// over the whole group.
    pub fn flatten(&self, mut progress: impl FnMut(u64, u64)) -> Result<()> {
        let clusters: Vec<u64> = self
            .members
            .iter()
            .map(|m| m.volume().size().div_ceil(m.volume().cluster_size()))
            .collect();
        let total: u64 = clusters.iter().sum();
        let mut base = 0;
        for (m, n) in self.members.iter().zip(&clusters) {
            m.volume().flatten(|d, _| progress(base + d, total))?;
            base += n;
        }
        progress(total, total);
        Ok(())
    }

    /// Changed extents of the primary between snapshot `from` and `to` (the
    /// live volume when `None`), outside the label/GPT.
    pub fn diff(&self, from: &str, to: Option<&str>) -> Result<Vec<Change>> {
        let v = self.primary().volume();
        Ok(volume::diff::clip(&v.diff(from, to)?, v.protected()))
    }

    /// Every member's changes, primary first, with its LUN UUID.
    pub fn diffs(&self, from: &str, to: Option<&str>) -> Result<Vec<(Uuid, Vec<Change>)>> {
        self.members
            .iter()
            .map(|m| {
                let v = m.volume();
                Ok((
                    m.uuid(),
                    volume::diff::clip(&v.diff(from, to)?, v.protected()),
                ))
            })
            .collect()
    }

    /// Write the diff file (docs/volumes.md) of every member between
    /// `from` and `to` (live when `None`). Returns the bytes written.
    pub fn write_diff(&self, from: &str, to: Option<&str>, w: &mut impl Write) -> Result<u64> {
        // A diff file carries extents at the LUN's current offsets and its
        // current size: both ends must have that layout.
        for m in &self.members {
            for name in std::iter::once(from).chain(to) {
                if m.volume().snapshots().iter().any(|s| s.name == name) {
                    m.same_layout_as(name, "a diff file from or to it")?;
                }
            }
        }
        let diffs = self.diffs(from, to)?;
        let sections: Vec<volume::diff::Section<'_>> = self
            .members
            .iter()
            .zip(diffs)
            .map(|(m, (_, changes))| volume::diff::Section {
                volume: m.volume(),
                changes,
                base: disk_ranges(m),
            })
            .collect();
        Ok(volume::diff::write_sections(&sections, from, to, w)?)
    }

    /// Verify a whole diff file (blake3, structure, one section per member
    /// with matching LUN UUID, size and cluster size) and only then replay
    /// it onto the members. The target should hold the diff's `from` state.
    pub fn apply_diff(&mut self, r: &mut impl Read) -> Result<volume::diff::DiffInfo> {
        self.apply_diff_with(r, &mut crate::progress::silent())
    }

    /// [`Group::apply_diff`], reporting the replay (phase `apply`) to
    /// `progress`.
    pub fn apply_diff_with(
        &mut self,
        r: &mut impl Read,
        progress: &mut dyn Progress,
    ) -> Result<volume::diff::DiffInfo> {
        if self.access == Access::ReadOnly {
            return Err(Error::ReadOnly {
                path: self.primary().path().to_path_buf(),
            });
        }
        let pool = pool_of(self.primary().path());
        let targets: Vec<&Volume> = self.members.iter().map(|m| &**m.volume()).collect();
        let bases: Vec<_> = self.members.iter().map(disk_ranges).collect();
        let info = volume::diff::apply_to_bases(r, &pool, &targets, &bases, progress)?;
        self.reload()?;
        Ok(info)
    }

    /// Check every data checksum of every member (primary first), each
    /// report with the member's path. See [`Volume::scrub`].
    pub fn scrub(&self, progress: &mut dyn Progress) -> Result<lungate_api::types::Scrub> {
        use lungate_api::types as wire;
        let mut luns = Vec::new();
        for m in &self.members {
            let r = m.volume().scrub(progress)?;
            luns.push(wire::LunScrub {
                path: m.path().to_path_buf(),
                layers_checked: r.layers_checked,
                layers_without_checksums: r.layers_without_checksums,
                clusters_checked: r.clusters_checked,
                bytes_checked: r.bytes_checked,
                clusters_unsummed: r.clusters_unsummed,
                errors: r
                    .errors
                    .into_iter()
                    .map(|e| wire::ScrubError {
                        layer: e.layer,
                        snapshot: e.snapshot,
                        live: e.live,
                        cluster: e.cluster,
                        offset: e.offset,
                        phys: e.phys,
                        affected: e.affected,
                        intact_in: e.intact_in,
                    })
                    .collect(),
            });
        }
        Ok(wire::Scrub { luns })
    }

    /// Space used per layer of every member.
    pub fn usage(&self) -> Vec<LayerUsage> {
        self.members
            .iter()
            .flat_map(|m| m.volume().usage())
            .collect()
    }
}

/// `POOL/NAME.lun` of a clone member, refusing a name that could leave
/// the pool (a VM name has no '/' and no leading '.').
fn clone_path(pool: &Path, c: &CloneMember) -> Result<PathBuf> {
    crate::format::validate_name(&c.name)
        .map_err(|why| Error::Invalid(format!("clone intent names {:?}: {why}", c.name)))?;
    Ok(crate::pool::lun_path(pool, &c.name))
}

/// Remove what a clone that never committed made (or what recovery
/// undoes), and only what it can prove that clone made: a LUN file whose
/// label carries the recorded UUID, or, before the label is written, a
/// file whose layers name that UUID or that holds no data at all; and in
/// its layers directories only manifest slots and layer files of that
/// UUID. Symlinks and anything else are left alone and reported in the
/// returned warnings.
fn remove_clone(pool: &Path, c: &CloneMember) -> Result<Vec<String>> {
    let mut warnings = Vec::new();
    let p = match clone_path(pool, c) {
        Ok(p) => p,
        Err(e) => {
            warnings.push(format!("{e}; nothing removed"));
            return Ok(warnings);
        }
    };
    if crate::backing::is_rbd(&p) {
        // Ours when its label names the clone, or when it has no label yet
        // (a clone's image is wiped of its parent's label at once).
        let ours = match Lun::probe_uuid(&p) {
            Ok(u) => u == c.uuid,
            Err(Error::NotALun { .. }) => crate::pool::lun_exists(&p),
            Err(_) => false,
        };
        if ours {
            #[cfg(feature = "rbd")]
            crate::backing::Backing::remove_rbd(&p)?;
        } else if crate::pool::lun_exists(&p) {
            warnings.push(format!(
                "{}: not the clone this operation made (LUN {}); left alone",
                p.display(),
                c.uuid
            ));
        }
        return Ok(warnings);
    }
    let layers = lungate_block::store::file::layers_dir(&p);
    let file = match p.symlink_metadata() {
        Ok(md) if md.file_type().is_symlink() || !md.is_file() => {
            warnings.push(format!("{}: not a regular file; left alone", p.display()));
            None
        }
        Ok(_) => Some(p.clone()),
        Err(_) => None,
    };
    let mut layers_ours = false;
    for dir in [
        layers.clone(),
        lungate_block::store::file::staging_dir(&layers),
    ] {
        layers_ours |= lungate_block::store::file::layers_belong_to(&dir, c.uuid);
    }
    if let Some(f) = &file {
        let ours = match Lun::probe_uuid(f) {
            Ok(u) => u == c.uuid,
            Err(_) => layers_ours || lungate_block::sys::holds_no_data(f).unwrap_or(false),
        };
        if ours {
            std::fs::remove_file(f).ctx(f, "remove clone")?;
        } else {
            warnings.push(format!(
                "{}: not the clone this operation made (LUN {}); left alone",
                f.display(),
                c.uuid
            ));
        }
    }
    for dir in [
        layers.clone(),
        lungate_block::store::file::staging_dir(&layers),
    ] {
        warnings.extend(lungate_block::store::file::remove_layers_of(&dir, c.uuid)?);
    }
    Ok(warnings)
}
