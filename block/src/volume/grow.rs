//! Growing a layered volume, and the layouts its older snapshots keep.
//!
//! A delta file's geometry (journal areas, data start) is a function of
//! the virtual size it was made for, so a grown volume does not rewrite
//! its layers: [`Volume::grow`] continues in a new, empty live delta of
//! the new size on top of the old live one (which stays in the chain,
//! unnamed). Older layers keep their smaller geometry: clusters past a
//! layer's size are never that layer's and read through to its parent
//! (and past the base's old end, from the grown LUN file). One manifest
//! commit is the grow's commit point.
//!
//! The owner (a LUN) moves regions as it grows, so its older snapshots
//! hold their regions at the old offsets. Before it changes its layout it
//! records that layout on every snapshot that has none
//! ([`Volume::record_layouts`]); the volume keeps those records opaque, in
//! the manifest, so a snapshot is always read with the layout it was taken
//! with (a snapshot without a record has the owner's current layout).

use std::collections::{BTreeMap, HashSet};
use uuid::Uuid;

use super::error::{Error, Result};
use super::header::Geometry;
use super::layer::{Delta, Layer};
use super::manifest::LayerRec;
use super::{lock, write};
use crate::volume::Volume;

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Volume {
    /// The layout recorded for each snapshot taken before the owner last
    /// changed its layout, by snapshot name; snapshots not listed have the
    /// current layout.
    pub fn snapshot_layouts(&self) -> BTreeMap<String, serde_json::Value> {
        let st = super::read(&self.state);
        if st.plain {
            return BTreeMap::new();
        }
        st.manifest
            .snapshots
            .iter()
            .filter_map(|s| {
                st.manifest
                    .layouts
                    .get(&s.layer)
                    .map(|l| (s.name.clone(), l.clone()))
            })
            .collect()
    }

    /// Record `layout` (the owner's current layout) on every snapshot that
    /// has no layout yet, and forget the layouts of layers no snapshot
    /// names any more; one manifest commit (none when nothing changes).
    /// The owner calls it before it changes its layout, so that every
    /// snapshot keeps the layout it was taken with. A plain volume has no
    /// snapshots: nothing to do.
    pub fn record_layouts(&self, layout: &serde_json::Value) -> Result<()> {
        self.writable()?;
        if self.native().is_some() {
            return Err(Error::Invalid(format!(
                "{}: a volume with native snapshots keeps no snapshot layouts",
                self.lun_path.display()
            )));
        }
        let _m = self.maintenance()?;
        let mut st = write(&self.state);
        if st.plain {
            return Ok(());
        }
        let mut m = st.manifest.clone();
        let named: HashSet<Uuid> = m.snapshots.iter().map(|s| s.layer).collect();
        m.layouts.retain(|id, _| named.contains(id));
        for id in named {
            m.layouts.entry(id).or_insert_with(|| layout.clone());
        }
        if m.layouts == st.manifest.layouts {
            return Ok(());
        }
        self.commit(&mut st, m)
    }

    /// Grow a layered volume to `size` bytes. This handle is done with
    /// afterwards (it still has the old size; dropping it writes nothing):
    /// the owner opens the volume again, at its label's size or larger
    /// ([`Volume::open`] takes the manifest's size when it is the larger).
    /// The live layer is flushed and becomes an unnamed
    /// layer under a new, empty live delta of the new size; one manifest
    /// commit (size and the new top) is the commit point: a crash before
    /// it leaves the volume as it was, after it the grown volume, whose
    /// added clusters read from the (grown) LUN file until written. The
    /// owner zeroes what it hands out. A plain volume is only a view of the
    /// file and grows by being reopened at the new size: refused here.
    pub fn grow(&self, size: u64) -> Result<()> {
        self.writable()?;
        let cs = self.geo.cluster_size;
        if self.native().is_some() {
            return Err(Error::Invalid(format!(
                "{}: growing a volume with native snapshots is not supported",
                self.lun_path.display()
            )));
        }
        if size <= self.geo.size {
            return Err(Error::Invalid(format!(
                "{}: volume is {} bytes; growing to {size} would not grow it",
                self.lun_path.display(),
                self.geo.size
            )));
        }
        if self.geo.size % cs != 0 {
            // The old layers' last cluster would be partial inside a
            // volume whose clusters are whole there.
            return Err(Error::Invalid(format!(
                "{}: volume size {} is not a multiple of its cluster size {cs}; it cannot grow with layers",
                self.lun_path.display(),
                self.geo.size
            )));
        }
        let geo = Geometry::new(cs, size).ok_or_else(|| {
            Error::Invalid(format!(
                "{}: size {size} too large for cluster size {cs}",
                self.lun_path.display()
            ))
        })?;
        {
            let _m = self.maintenance()?;
            let _io = self.io.write_blocking();
            let mut st = write(&self.state);
            if st.plain {
                return Err(Error::Invalid(format!(
                    "{}: a plain volume grows with its file (reopen it at the new size)",
                    self.lun_path.display()
                )));
            }
            self.drop_spare(&mut lock(&self.spare));
            self.flush_locked(&st)?;
            let old_id = st.layer(st.top).id();
            let id = Uuid::new_v4();
            let created = now();
            let mut m = st.manifest.clone();
            m.size = size;
            m.layers.push(LayerRec {
                id,
                parent: self.parent_ref(old_id),
                created,
            });
            m.top = id;
            m.flatten = None;
            let d = Delta::create(
                &*self.store,
                id,
                old_id,
                self.lun,
                geo,
                created,
                m.checksums,
            )?;
            drop(d);
            if let Err(e) = self.commit(&mut st, m) {
                let _ = self.store.remove_layer(id);
                return Err(e);
            }
            let old = st.node(st.top).layer.clone();
            if let Layer::Delta(d) = &*old {
                if let Err(e) = d.set_frozen("", "") {
                    tracing::warn!("grow: frozen flag not recorded in the old live layer: {e}");
                }
            }
        }
        // The manifest moved on; this handle must not flush its old
        // view (nothing is pending: it was flushed under the locks).
        self.crashed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}
