//! A volume over a store with its own snapshots ([`NativeTree`], Ceph
//! RBD): the chain is one object (the base) and every tree operation is
//! handed to the store, under the volume's own locks. Kept apart from
//! `engine.rs` so the file store's behaviour is untouched: each tree
//! operation there starts with one `if let Some(t) = self.native()` that
//! lands here.
//!
//! What the volume still does itself: argument checks, the maintenance
//! lock, draining in-flight requests (the I/O lock) and flushing before a
//! snapshot or revert, keeping the protected ranges (label, GPT) out of a
//! revert — they are not layered, so they keep their current bytes — and
//! out of a diff, and marking everything dirty after a revert.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use uuid::Uuid;

use super::engine::{Change, LayerUsage, SnapshotInfo, Volume, VolumeConfig, VolumeOptions};
use super::error::{Error, IoCtx, Result};
use super::lock;
use super::manifest::{Manifest, Parent};
use crate::engine::IoEngine;
use crate::progress::Progress;
use crate::store::{NativeTree, Store};

/// What [`Volume::open_in`] needs besides the store: a [`VolumeConfig`]
/// without the LUN file (the store holds the LUN's bytes).
#[derive(Debug, Clone)]
pub struct StoreVolume {
    /// How messages name the LUN (a file path, or `rbd:POOL/IMAGE`).
    pub lun_path: PathBuf,
    pub lun_uuid: Uuid,
    pub size: u64,
    pub protected: Vec<Range<u64>>,
    pub options: VolumeOptions,
    pub engine: Option<IoEngine>,
}

impl From<VolumeConfig> for StoreVolume {
    fn from(c: VolumeConfig) -> StoreVolume {
        StoreVolume {
            lun_path: c.lun_path,
            lun_uuid: c.lun_uuid,
            size: c.size,
            protected: c.protected,
            options: c.options,
            engine: c.engine,
        }
    }
}

/// The nearest snapshot strictly above layer `id` in manifest `m`.
fn named_above(m: &Manifest, id: Uuid) -> Option<String> {
    let parent = |x: Uuid| -> Option<Uuid> {
        if x == m.lun {
            return None;
        }
        match &m.layer(x)?.parent {
            Parent::Base => Some(m.lun),
            Parent::Layer { id } => Some(*id),
            Parent::None | Parent::External { .. } => None,
        }
    };
    let mut at = parent(id);
    for _ in 0..=m.layers.len() + 1 {
        let x = at?;
        if let Some(s) = m.snapshots.iter().find(|s| s.layer == x) {
            return Some(s.name.clone());
        }
        at = parent(x);
    }
    None
}

/// The snapshot list of a native tree, as the file store's volume gives it.
pub(super) fn infos(m: &Manifest) -> Vec<SnapshotInfo> {
    let current = named_above(m, m.top);
    m.snapshots
        .iter()
        .map(|s| SnapshotInfo {
            name: s.name.clone(),
            description: s.description.clone(),
            created: s.created,
            parent: named_above(m, s.layer),
            layer: s.layer,
            current: current.as_deref() == Some(s.name.as_str()),
        })
        .collect()
}

impl Volume {
    /// The store's own tree, when it has one.
    pub fn native(&self) -> Option<&dyn NativeTree> {
        self.store.native_tree()
    }

    /// The store the volume keeps its bytes in.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub(super) fn native_snapshot(
        &self,
        t: &dyn NativeTree,
        name: &str,
        description: &str,
    ) -> Result<SnapshotInfo> {
        let _m = lock(&self.maint);
        let _io = self.io.write_blocking();
        self.flush()?;
        t.snapshot(name, description)?;
        self.native_snapshots(t)
            .into_iter()
            .find(|s| s.name == name)
            .ok_or_else(|| Error::NoSnapshot(name.into()))
    }

    pub(super) fn native_snapshots(&self, t: &dyn NativeTree) -> Vec<SnapshotInfo> {
        match t.manifest() {
            Ok(Some(m)) => infos(&m),
            Ok(None) => vec![],
            Err(e) => {
                tracing::warn!("{}: snapshot tree unreadable: {e}", self.lun_path.display());
                vec![]
            }
        }
    }

    pub(super) fn native_revert(&self, t: &dyn NativeTree, name: &str) -> Result<()> {
        let _m = lock(&self.maint);
        let _io = self.io.write_blocking();
        self.flush()?;
        // The label and GPT are not layered: they keep today's bytes.
        let mut kept = Vec::new();
        for r in &self.protected {
            let mut b = vec![0u8; (r.end - r.start) as usize];
            self.home()
                .read_at(&mut b, r.start)
                .ctx(&self.lun_path, "read label region")?;
            kept.push((r.start, b));
        }
        t.revert(name, &kept)?;
        // The store wrote them already where it could (before its commit
        // point: a crash never leaves the snapshot's label); again here.
        for (at, b) in kept {
            self.home()
                .write_at(&b, at)
                .ctx(&self.lun_path, "restore label region")?;
        }
        self.home().sync().ctx(&self.lun_path, "flush")?;
        self.dirty.mark_all();
        Ok(())
    }

    pub(super) fn native_delete(&self, t: &dyn NativeTree, name: &str) -> Result<()> {
        let _m = lock(&self.maint);
        t.delete_snapshot(name)
    }

    pub(super) fn native_flatten(
        &self,
        t: &dyn NativeTree,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<()> {
        let _m = lock(&self.maint);
        t.flatten(progress)
    }

    /// A diff without the protected ranges (they are not layered).
    pub(super) fn native_diff(
        &self,
        t: &dyn NativeTree,
        from: &str,
        to: Option<&str>,
    ) -> Result<Vec<Change>> {
        let mut out = Vec::new();
        for c in t.diff(from, to)? {
            for (s, e, protected) in self.segments(c.offset, c.length) {
                if !protected {
                    out.push(Change {
                        offset: s,
                        length: e - s,
                        kind: c.kind,
                    });
                }
            }
        }
        Ok(out)
    }

    pub(super) fn native_usage(&self, t: &dyn NativeTree) -> Vec<LayerUsage> {
        t.usage().unwrap_or_else(|e| {
            tracing::warn!("{}: usage: {e}", self.lun_path.display());
            vec![]
        })
    }

    /// Make a new LUN object `target` (a name in this store's pool, for
    /// LUN `target_lun`) from snapshot `name` and open its volume.
    pub fn clone_native(
        &self,
        name: &str,
        target: &str,
        target_cfg: StoreVolume,
    ) -> Result<Volume> {
        self.writable()?;
        let t = self
            .native()
            .ok_or_else(|| Error::Invalid("not a volume with native snapshots".into()))?;
        let _m = lock(&self.maint);
        if target_cfg.size != self.geo.size {
            return Err(Error::Invalid(format!(
                "clone target {} is {} bytes; the volume is {}",
                target_cfg.lun_path.display(),
                target_cfg.size,
                self.geo.size
            )));
        }
        let store = t.clone_to(name, target, target_cfg.lun_uuid)?;
        Volume::open_in(store, target_cfg)
    }

    /// Remove every snapshot of a native store (the LUN is being deleted).
    pub fn destroy_native(&self) -> Result<()> {
        match self.native() {
            Some(t) => {
                let _m = lock(&self.maint);
                t.destroy()
            }
            None => Ok(()),
        }
    }

    pub(super) fn native_delete_with(
        &self,
        t: &dyn NativeTree,
        name: &str,
        progress: &mut dyn Progress,
    ) -> Result<()> {
        progress.update("merge", 0, 0);
        self.native_delete(t, name)
    }
}
