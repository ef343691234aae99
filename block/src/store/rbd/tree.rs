//! [`RbdStore`]: a LUN image as a [`Store`] whose tree is RBD's own.
//!
//! The store keeps no layer objects: the image is the base and the only
//! layer, and every tree operation maps to RBD's:
//!
//! | lungate | RBD |
//! | --- | --- |
//! | snapshot | `rbd_snap_create` of `lungate-<frozen layer uuid>` |
//! | revert | `rbd_snap_rollback` (O(allocated objects); see docs/scale-out.md) |
//! | delete snapshot | `rbd_snap_remove` (refused while a clone uses it) |
//! | clone | `rbd_snap_protect` + `rbd_clone3` into a new image |
//! | flatten | `rbd_flatten_with_progress` |
//! | diff | `rbd_diff_iterate2` between the two snapshots |
//! | usage | `rbd_diff_iterate2` per snapshot (what `rbd du` reports) |
//!
//! The tree (names, descriptions, creation times, parents, the snapshot
//! the live image continues from, clones) is the file store's
//! [`Manifest`], checksummed as there and kept hex-encoded in the image's
//! metadata key `lungate.manifest` (one atomic omap update of the image
//! header). A snapshot is made before the manifest that names it and
//! removed after the manifest that drops it, so a crash between the two
//! leaves an RBD snapshot no manifest names, which the next read-write open
//! removes; a revert records its target in `lungate.revert` first and a
//! read-write open finishes an interrupted one.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use uuid::Uuid;

use super::{Image, ImageSpec, Pool, RbdObject};
use crate::store::{NativeTree, Object, Store};
use crate::volume::error::{corrupt, Error, IoCtx, Result};
use crate::volume::manifest::{self, Dependent, LayerRec, Loaded, Manifest, Parent, SnapRec};
use crate::volume::{Change, ChangeKind, LayerUsage};

const MANIFEST_KEY: &str = "lungate.manifest";
const REVERT_KEY: &str = "lungate.revert";
const SNAP_PREFIX: &str = "lungate-";
/// Metadata keys of ours a clone must not inherit from its parent.
const INHERITED: [&str; 3] = [MANIFEST_KEY, REVERT_KEY, "lungate.group-op"];

fn snap_name(layer: Uuid) -> String {
    format!("{SNAP_PREFIX}{layer}")
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A LUN's image as a store.
pub struct RbdStore {
    spec: ImageSpec,
    location: PathBuf,
    pool: Arc<Pool>,
    image: Arc<Image>,
    base: Arc<dyn Object>,
    lun: Uuid,
    size: u64,
    writable: bool,
    /// The manifest and its generation, as last read or committed.
    tree: Mutex<Option<(Manifest, u64)>>,
}

impl std::fmt::Debug for RbdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RbdStore")
            .field("image", &self.location)
            .finish()
    }
}

impl RbdStore {
    /// The store of LUN `lun` (`size` bytes) in `image`, whose bytes are
    /// `base` (an [`RbdObject`] of the same image). A read-write store
    /// finishes an interrupted revert and removes RBD snapshots of ours
    /// that no manifest names (a crash before the manifest commit).
    pub fn open(
        spec: ImageSpec,
        base: Arc<RbdObject>,
        lun: Uuid,
        size: u64,
    ) -> Result<(RbdStore, Vec<String>)> {
        let image = base.image().clone();
        let writable = image.is_writable();
        let location = spec.path();
        let store = RbdStore {
            pool: image.pool().clone(),
            image,
            base,
            location,
            spec,
            lun,
            size,
            writable,
            tree: Mutex::new(None),
        };
        let loaded = store.load()?;
        *store.lock_tree() = loaded;
        let mut warnings = Vec::new();
        if writable {
            store.recover_tree(&mut warnings)?;
        }
        Ok((store, warnings))
    }

    pub fn image(&self) -> &Arc<Image> {
        &self.image
    }

    pub fn spec(&self) -> &ImageSpec {
        &self.spec
    }

    fn lock_tree(&self) -> std::sync::MutexGuard<'_, Option<(Manifest, u64)>> {
        self.tree.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn io<T>(&self, r: io::Result<T>, op: &'static str) -> Result<T> {
        r.ctx(&self.location, op)
    }

    fn load(&self) -> Result<Option<(Manifest, u64)>> {
        let Some(v) = self.io(self.image.metadata_get(MANIFEST_KEY), "read manifest")? else {
            return Ok(None);
        };
        let b = unhex(&v).ok_or_else(|| corrupt(&self.location, "manifest metadata is not hex"))?;
        let (m, g) = manifest::decode(&b)
            .map_err(|why| corrupt(&self.location, format!("manifest: {why}")))?;
        if m.lun != self.lun || m.size != self.size {
            return Err(corrupt(
                &self.location,
                format!(
                    "manifest is for LUN {} of {} bytes, not LUN {} of {} bytes",
                    m.lun, m.size, self.lun, self.size
                ),
            ));
        }
        Ok(Some((m, g)))
    }

    fn commit(&self, tree: &mut Option<(Manifest, u64)>, m: Manifest) -> Result<()> {
        m.validate().map_err(|why| {
            Error::Invalid(format!("{}: manifest: {why}", self.location.display()))
        })?;
        let g = tree.as_ref().map_or(0, |(_, g)| *g) + 1;
        let v = hex(&manifest::encode(&m, g));
        self.io(self.image.metadata_set(MANIFEST_KEY, &v), "commit manifest")?;
        *tree = Some((m, g));
        Ok(())
    }

    fn writable(&self) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnly(self.location.clone()));
        }
        Ok(())
    }

    /// A manifest with no snapshots yet: the live layer continues from the
    /// base (the image as it was before the first snapshot).
    fn fresh(&self) -> Manifest {
        Manifest {
            lun: self.lun,
            size: self.size,
            cluster_size: 64 << 10,
            lun_path: PathBuf::from(&self.spec.image),
            layers: vec![],
            top: self.lun,
            snapshots: vec![],
            dependents: vec![],
            flatten: None,
            retired: vec![],
            checksums: false,
            layouts: Default::default(),
        }
    }

    fn parent_ref(&self, id: Uuid) -> Parent {
        if id == self.lun {
            Parent::Base
        } else {
            Parent::Layer { id }
        }
    }

    fn recover_tree(&self, warnings: &mut Vec<String>) -> Result<()> {
        if let Some(target) = self.io(self.image.metadata_get(REVERT_KEY), "read revert intent")? {
            warnings.push(format!(
                "{}: finished a revert to RBD snapshot {target} that was interrupted",
                self.location.display()
            ));
            self.io(self.image.snap_rollback(&target, |_, _| {}), "rollback")?;
            self.io(
                self.image.metadata_remove(REVERT_KEY),
                "clear revert intent",
            )?;
        }
        let tree = self.lock_tree();
        let named: Vec<String> = tree
            .as_ref()
            .map(|(m, _)| m.snapshots.iter().map(|s| snap_name(s.layer)).collect())
            .unwrap_or_default();
        for s in self.io(self.image.snap_list(), "list snapshots")? {
            if s.starts_with(SNAP_PREFIX) && !named.contains(&s) {
                if self.image.snap_is_protected(&s).unwrap_or(false) {
                    warnings.push(format!(
                        "{}@{s}: kept a protected RBD snapshot the manifest does not name",
                        self.location.display()
                    ));
                    continue;
                }
                self.io(self.image.snap_remove(&s), "remove orphan snapshot")?;
                warnings.push(format!(
                    "{}@{s}: removed an RBD snapshot no manifest named (a snapshot a crash interrupted)",
                    self.location.display()
                ));
            }
        }
        Ok(())
    }

    fn snap_layer(m: &Manifest, name: &str) -> Result<Uuid> {
        m.snapshot(name)
            .map(|s| s.layer)
            .ok_or_else(|| Error::NoSnapshot(name.into()))
    }

    /// Open another LUN image of the cluster by its location (a clone's
    /// parent or a parent's clone).
    fn peer(&self, location: &Path) -> Result<Arc<Image>> {
        let s = location.to_string_lossy();
        let spec = ImageSpec::parse(&s).map_err(Error::Invalid)?;
        let pool = if spec.pool.pool == self.spec.pool.pool
            && spec.pool.namespace == self.spec.pool.namespace
        {
            self.pool.clone()
        } else {
            Arc::new(self.io(Pool::open(&spec.pool), "open pool")?)
        };
        Ok(Arc::new(
            pool.open_image(&spec.image, true)
                .ctx(location, "open RBD image")?,
        ))
    }

    fn peer_manifest(img: &Image) -> Option<(Manifest, u64)> {
        let v = img.metadata_get(MANIFEST_KEY).ok()??;
        manifest::decode(&unhex(&v)?).ok()
    }

    /// The location of a clone target `name` in our pool.
    fn sibling(&self, name: &str) -> PathBuf {
        self.spec.pool.image(name).path()
    }

    /// Snapshots in the order RBD took them (its snapshot ids), ours only.
    fn time_order(&self, m: &Manifest) -> Result<Vec<Uuid>> {
        let listed = self.io(self.image.snap_list(), "list snapshots")?;
        Ok(listed
            .iter()
            .filter_map(|n| n.strip_prefix(SNAP_PREFIX))
            .filter_map(|u| Uuid::parse_str(u).ok())
            .filter(|u| m.snapshots.iter().any(|s| s.layer == *u))
            .collect())
    }

    fn allocated(img: &Image, from: Option<&str>, size: u64) -> io::Result<u64> {
        Ok(img
            .diff(from, 0, size, true)?
            .iter()
            .filter(|(_, _, e)| *e)
            .map(|(_, l, _)| l)
            .sum())
    }
}

impl Store for RbdStore {
    fn base(&self) -> &Arc<dyn Object> {
        &self.base
    }
    fn location(&self) -> &Path {
        &self.location
    }
    /// No layer objects, ever: the volume stays a chain of one.
    fn exists(&self) -> bool {
        false
    }
    fn create_layer(&self, _id: Uuid, _initial: &[u8], _len: u64) -> Result<Arc<dyn Object>> {
        Err(Error::Invalid(format!(
            "{}: an RBD LUN keeps its snapshots as RBD snapshots, not layers",
            self.location.display()
        )))
    }
    fn open_layer(&self, id: Uuid, _writable: bool) -> Result<Arc<dyn Object>> {
        Err(corrupt(
            &self.location,
            format!("layer {id} is needed, but an RBD LUN has no layers"),
        ))
    }
    fn list_layers(&self) -> Result<Vec<Uuid>> {
        Ok(vec![])
    }
    fn has_layer(&self, _id: Uuid) -> bool {
        false
    }
    fn remove_layer(&self, _id: Uuid) -> Result<()> {
        Ok(())
    }
    fn load_manifest(&self) -> Result<Option<Loaded>> {
        Ok(None)
    }
    fn commit_manifest(&self, _m: &Manifest, _generation: u64) -> Result<()> {
        Err(Error::Invalid(format!(
            "{}: an RBD LUN's tree is committed by its native operations",
            self.location.display()
        )))
    }
    fn reference(&self) -> PathBuf {
        self.location.clone()
    }
    fn recover(&self, _lun: Uuid) -> Result<Vec<String>> {
        Ok(vec![])
    }
    fn native_tree(&self) -> Option<&dyn NativeTree> {
        Some(self)
    }
}

impl NativeTree for RbdStore {
    fn manifest(&self) -> Result<Option<Manifest>> {
        Ok(self.lock_tree().as_ref().map(|(m, _)| m.clone()))
    }

    fn forget_if_empty(&self) -> Result<bool> {
        self.writable()?;
        let mut tree = self.lock_tree();
        let empty = match tree.as_ref() {
            None => return Ok(true),
            Some((m, _)) => {
                m.snapshots.is_empty()
                    && m.dependents.is_empty()
                    && m.flatten.is_none()
                    && m.layers.iter().all(|l| l.parent == Parent::Base)
            }
        };
        if empty {
            // The same as no tree (see `fresh`): removing it loses nothing,
            // whenever a crash comes.
            self.io(
                self.image.metadata_remove(MANIFEST_KEY),
                "forget the manifest",
            )?;
            *tree = None;
        }
        Ok(empty)
    }

    fn snapshot(&self, name: &str, description: &str) -> Result<()> {
        self.writable()?;
        let mut tree = self.lock_tree();
        let mut m = tree
            .as_ref()
            .map_or_else(|| self.fresh(), |(m, _)| m.clone());
        if m.snapshot(name).is_some() {
            return Err(Error::SnapshotExists(name.into()));
        }
        let frozen = m.top;
        let created = now();
        let top = Uuid::new_v4();
        self.io(
            self.image.snap_create(&snap_name(frozen)),
            "create snapshot",
        )?;
        m.layers.push(LayerRec {
            id: top,
            parent: self.parent_ref(frozen),
            created,
        });
        m.top = top;
        m.snapshots.push(SnapRec {
            name: name.into(),
            layer: frozen,
            created,
            description: description.into(),
        });
        if let Err(e) = self.commit(&mut tree, m) {
            let _ = self.image.snap_remove(&snap_name(frozen));
            return Err(e);
        }
        Ok(())
    }

    fn revert(&self, name: &str) -> Result<()> {
        self.writable()?;
        let mut tree = self.lock_tree();
        let Some((mut m, _)) = tree.clone() else {
            return Err(Error::NoSnapshot(name.into()));
        };
        let target = Self::snap_layer(&m, name)?;
        let rbd_snap = snap_name(target);
        // The intent first: a crash inside the rollback leaves a mix of old
        // and new objects, which the next open finishes rolling back.
        self.io(
            self.image.metadata_set(REVERT_KEY, &rbd_snap),
            "record revert intent",
        )?;
        self.io(self.image.snap_rollback(&rbd_snap, |_, _| {}), "rollback")?;
        let old = m.top;
        let top = Uuid::new_v4();
        m.layers.retain(|l| l.id != old);
        m.layers.push(LayerRec {
            id: top,
            parent: self.parent_ref(target),
            created: now(),
        });
        m.top = top;
        gc(&mut m);
        self.commit(&mut tree, m)?;
        self.io(
            self.image.metadata_remove(REVERT_KEY),
            "clear revert intent",
        )?;
        Ok(())
    }

    fn delete_snapshot(&self, name: &str) -> Result<()> {
        self.writable()?;
        let mut tree = self.lock_tree();
        let Some((mut m, _)) = tree.clone() else {
            return Err(Error::NoSnapshot(name.into()));
        };
        let layer = Self::snap_layer(&m, name)?;
        let rbd_snap = snap_name(layer);
        let users: Vec<String> = m
            .dependents
            .iter()
            .filter(|d| d.layer == layer)
            .filter(|d| self.clone_alive(d))
            .map(|d| d.dir.display().to_string())
            .collect();
        if !users.is_empty() {
            return Err(Error::Invalid(format!(
                "snapshot {name:?} of {} is the parent of clones ({}); flatten or delete them first",
                self.location.display(),
                users.join(", ")
            )));
        }
        if self.io(self.image.snap_is_protected(&rbd_snap), "check snapshot")? {
            self.io(self.image.snap_unprotect(&rbd_snap), "unprotect snapshot")?;
        }
        m.snapshots.retain(|s| s.name != name);
        m.dependents.retain(|d| d.layer != layer);
        // Its layer goes; its children continue from its parent (an RBD
        // snapshot is a whole point in time: nothing to merge).
        if let Some(parent) = m.layer(layer).map(|l| l.parent.clone()) {
            for l in &mut m.layers {
                if l.parent == (Parent::Layer { id: layer }) {
                    l.parent = parent.clone();
                }
            }
            m.layers.retain(|l| l.id != layer);
        }
        gc(&mut m);
        self.commit(&mut tree, m)?;
        self.io(self.image.snap_remove(&rbd_snap), "remove snapshot")?;
        Ok(())
    }

    fn read_snapshot(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        let layer = {
            let tree = self.lock_tree();
            let m = &tree
                .as_ref()
                .ok_or_else(|| Error::NoSnapshot(name.into()))?
                .0;
            Self::snap_layer(m, name)?
        };
        let img = self.io(
            self.pool.open_snapshot(&self.spec.image, &snap_name(layer)),
            "open snapshot",
        )?;
        self.io(img.read_at(buf, offset), "read snapshot")
    }

    fn clone_to(&self, name: &str, target: &str, target_lun: Uuid) -> Result<Arc<dyn Store>> {
        self.writable()?;
        let mut tree = self.lock_tree();
        let Some((mut m, _)) = tree.clone() else {
            return Err(Error::NoSnapshot(name.into()));
        };
        let layer = Self::snap_layer(&m, name)?;
        let rbd_snap = snap_name(layer);
        if !self.io(self.image.snap_is_protected(&rbd_snap), "check snapshot")? {
            self.io(self.image.snap_protect(&rbd_snap), "protect snapshot")?;
        }
        let tloc = self.sibling(target);
        // The parent records its dependent first, so no crash leaves a
        // clone whose snapshot the parent might delete.
        m.dependents.push(Dependent {
            dir: tloc.clone(),
            lun: target_lun,
            layer,
        });
        self.commit(&mut tree, m)?;
        drop(tree);
        self.pool
            .clone_image(&self.pool, &self.spec.image, &rbd_snap, target)
            .ctx(&tloc, "rbd clone")?;
        let img = Arc::new(
            self.pool
                .open_image(target, true)
                .ctx(&tloc, "open clone")?,
        );
        // The clone's ownership lock, as `Backing::open` takes it for every
        // LUN opened read-write: kept on this handle, which does the
        // clone's I/O, so fencing covers the clone as well.
        self.io(img.lock_acquire(), "take the clone's exclusive lock")?;
        // librbd copies the parent's metadata into a clone: none of ours
        // (the parent's tree, intents) is the clone's.
        for key in INHERITED {
            self.io(img.metadata_remove(key), "clear inherited metadata")?;
        }
        let spec = self.spec.pool.image(target);
        let base = Arc::new(RbdObject::new(img.clone(), tloc.clone()));
        let (store, _) = RbdStore::open(spec, base, target_lun, self.size)?;
        let top = Uuid::new_v4();
        let tm = Manifest {
            lun: target_lun,
            size: self.size,
            cluster_size: 64 << 10,
            lun_path: PathBuf::from(target),
            layers: vec![LayerRec {
                id: top,
                parent: Parent::External {
                    dir: self.location.clone(),
                    id: layer,
                    lun: Some(self.lun),
                },
                created: now(),
            }],
            top,
            snapshots: vec![],
            dependents: vec![],
            flatten: None,
            retired: vec![],
            checksums: false,
            layouts: Default::default(),
        };
        {
            let mut t = store.lock_tree();
            store.commit(&mut t, tm)?;
        }
        Ok(Arc::new(store))
    }

    fn flatten(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<()> {
        self.writable()?;
        let parent = {
            let tree = self.lock_tree();
            tree.as_ref().and_then(|(m, _)| {
                m.layers.iter().find_map(|l| match &l.parent {
                    Parent::External { dir, id, .. } => Some((dir.clone(), *id)),
                    _ => None,
                })
            })
        };
        let Some((pdir, _)) = parent else {
            progress(self.size, self.size);
            return Ok(());
        };
        self.io(self.image.flatten(&mut *progress), "flatten")?;
        let mut tree = self.lock_tree();
        if let Some((mut m, _)) = tree.clone() {
            for l in &mut m.layers {
                if matches!(l.parent, Parent::External { .. }) {
                    l.parent = Parent::None;
                }
            }
            self.commit(&mut tree, m)?;
        }
        drop(tree);
        // The parent no longer pins its snapshot for us.
        if let Ok(img) = self.peer(&pdir) {
            if let Some((mut pm, g)) = Self::peer_manifest(&img) {
                pm.dependents.retain(|d| d.lun != self.lun);
                let v = hex(&manifest::encode(&pm, g + 1));
                if let Err(e) = img.metadata_set(MANIFEST_KEY, &v) {
                    tracing::warn!(
                        "{}: flattened, but its parent {} still lists it: {e}",
                        self.location.display(),
                        pdir.display()
                    );
                }
            }
        }
        Ok(())
    }

    fn diff(&self, from: &str, to: Option<&str>) -> Result<Vec<Change>> {
        let m = self
            .manifest()?
            .ok_or_else(|| Error::NoSnapshot(from.into()))?;
        let a = Self::snap_layer(&m, from)?;
        let b = to.map(|n| Self::snap_layer(&m, n)).transpose()?;
        let order = self.time_order(&m)?;
        let pos = |u: Uuid| order.iter().position(|x| *x == u);
        // RBD diffs run forward in time; a diff towards an older point
        // lists the same extents, all as data (read from `to`).
        let (older, newer, forward) = match b {
            None => (a, None, true),
            Some(b) if pos(a) <= pos(b) => (a, Some(b), true),
            Some(b) => (b, Some(a), false),
        };
        let img = match newer {
            None => self.image.clone(),
            Some(n) => Arc::new(self.io(
                self.pool.open_snapshot(&self.spec.image, &snap_name(n)),
                "open snapshot",
            )?),
        };
        let runs = self.io(
            img.diff(Some(&snap_name(older)), 0, self.size, false),
            "diff",
        )?;
        let mut out: Vec<Change> = Vec::new();
        for (o, l, exists) in runs {
            let kind = if exists || !forward {
                ChangeKind::Data
            } else {
                ChangeKind::Zero
            };
            match out.last_mut() {
                Some(c) if c.offset + c.length == o && c.kind == kind => c.length += l,
                _ => out.push(Change {
                    offset: o,
                    length: l,
                    kind,
                }),
            }
        }
        Ok(out)
    }

    fn usage(&self) -> Result<Vec<LayerUsage>> {
        let m = self.manifest()?;
        let mut out = Vec::new();
        let mut prev: Option<String> = None;
        if let Some(m) = &m {
            for layer in self.time_order(m)? {
                let snap = snap_name(layer);
                let img = self.io(
                    self.pool.open_snapshot(&self.spec.image, &snap),
                    "open snapshot",
                )?;
                let bytes = self.io(Self::allocated(&img, prev.as_deref(), self.size), "du")?;
                out.push(LayerUsage {
                    layer,
                    path: PathBuf::from(format!("{}@{snap}", self.location.display())),
                    snapshot: m
                        .snapshots
                        .iter()
                        .find(|s| s.layer == layer)
                        .map(|s| s.name.clone()),
                    live: false,
                    in_chain: false,
                    external: false,
                    allocated_bytes: bytes,
                    disk_bytes: bytes,
                });
                prev = Some(snap);
            }
        }
        let live = self.io(
            Self::allocated(&self.image, prev.as_deref(), self.size),
            "du",
        )?;
        out.push(LayerUsage {
            layer: m.as_ref().map_or(self.lun, |m| m.top),
            path: self.location.clone(),
            snapshot: None,
            live: true,
            in_chain: true,
            external: false,
            allocated_bytes: live,
            disk_bytes: live,
        });
        Ok(out)
    }

    fn dependents(&self) -> Vec<PathBuf> {
        let Ok(Some(m)) = self.manifest() else {
            return vec![];
        };
        m.dependents
            .iter()
            .filter(|d| self.clone_alive(d))
            .map(|d| d.dir.clone())
            .collect()
    }

    fn destroy(&self) -> Result<()> {
        self.writable()?;
        let deps = self.dependents();
        if !deps.is_empty() {
            return Err(Error::Invalid(format!(
                "{} cannot be deleted: clones depend on its snapshots: {}",
                self.location.display(),
                deps.iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        for s in self.io(self.image.snap_list(), "list snapshots")? {
            if self.image.snap_is_protected(&s).unwrap_or(false) {
                self.io(self.image.snap_unprotect(&s), "unprotect snapshot")?;
            }
            self.io(self.image.snap_remove(&s), "remove snapshot")?;
        }
        // The image itself is removed by whoever closes it last
        // ([`remove_image`]): librbd refuses to remove an open image.
        Ok(())
    }
}

impl RbdStore {
    /// Whether the clone recorded in `d` still reads from us (exists and
    /// has not been flattened). Unknown counts as alive.
    fn clone_alive(&self, d: &Dependent) -> bool {
        let Ok(img) = self.peer(&d.dir) else {
            // Gone for certain only if the image is not in the pool.
            let name = ImageSpec::parse(&d.dir.to_string_lossy()).map(|s| s.image);
            return match (name, self.pool.list()) {
                (Ok(n), Ok(all)) => all.contains(&n),
                _ => true,
            };
        };
        match Self::peer_manifest(&img) {
            None => true,
            Some((m, _)) => m.layers.iter().any(|l| {
                matches!(&l.parent, Parent::External { id, lun, .. }
                    if *id == d.layer && lun.is_none_or(|u| u == self.lun))
            }),
        }
    }
}

/// Drop unnamed layers nothing continues from (an old live layer after a
/// revert, a layer whose snapshot was deleted): the tree names only what
/// a snapshot, the live layer or a clone needs.
fn gc(m: &mut Manifest) {
    loop {
        let named: Vec<Uuid> = m.snapshots.iter().map(|s| s.layer).collect();
        let pinned: Vec<Uuid> = m.dependents.iter().map(|d| d.layer).collect();
        let removable = m.layers.iter().position(|l| {
            l.id != m.top
                && !named.contains(&l.id)
                && !pinned.contains(&l.id)
                && !m
                    .layers
                    .iter()
                    .any(|c| c.parent == (Parent::Layer { id: l.id }))
        });
        match removable {
            Some(i) => {
                m.layers.remove(i);
            }
            None => return,
        }
    }
}

/// Remove the LUN image at `spec` (after [`NativeTree::destroy`] and once
/// every handle on it is closed).
pub fn remove_image(spec: &ImageSpec) -> io::Result<()> {
    Pool::open(&spec.pool)?.remove(&spec.image)
}
