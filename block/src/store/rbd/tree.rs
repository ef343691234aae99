//! [`RbdStore`]: a LUN image as a [`Store`] whose tree is RBD's own.
//!
//! The store keeps no layer objects: the LUN's bytes are the base and the
//! only layer, and every tree operation maps to RBD's:
//!
//! | lungate | RBD |
//! | --- | --- |
//! | snapshot | `rbd_snap_create` of `lungate-<frozen layer uuid>` on the live image |
//! | revert | `rbd_snap_protect` + `rbd_clone3` of the snapshot into `NAME.lun~<new top uuid>`, which becomes the live image (clone-and-swap: a few metadata operations whatever the size; see docs/scale-out.md) |
//! | delete snapshot | `rbd_snap_remove` (refused while a clone uses it; kept hidden while a revert clone reads from it) |
//! | clone | `rbd_snap_protect` + `rbd_clone3` into a new image |
//! | flatten | `rbd_flatten_with_progress` (of the LUN image if it is a clone, and of the live image if a revert made it one) |
//! | diff | `rbd_diff_iterate2` between the two snapshots (across images: the union of each image's part) |
//! | usage | `rbd_diff_iterate2` per snapshot (what `rbd du` reports) |
//!
//! The image `NAME.lun` is the LUN's *anchor* for good: its name, its
//! ownership lock and its metadata are what the pool, the coordinator,
//! fencing and handover know. Its bytes are the live bytes until the first
//! revert; from then on the live bytes are in a revert clone named in the
//! manifest (`live`). The tree (names, descriptions, creation times,
//! parents, the snapshot the live image continues from, clones, which
//! image holds each snapshot and what each revert clone was cloned from)
//! is the file store's [`Manifest`], checksummed as there and kept
//! hex-encoded in the anchor's metadata key `lungate.manifest` (one atomic
//! omap update of the image header).
//!
//! Crash rules. A snapshot is made before the manifest that names it and
//! removed after the manifest that drops it; a revert clone is made (and
//! given the label's bytes) before the manifest that makes it live, and the
//! image it replaces is removed after. The manifest is the only truth: a
//! read-write open removes what it does not account for — RBD snapshots of
//! ours no manifest needs and images `NAME.lun~<uuid>` it does not name
//! (a crash before a commit leaves such a clone, one after it the old live
//! image) — so a crash at any point leaves the old or the new tree whole
//! and no leak after the next open. A revert intent `lungate.revert` (the
//! rollback revert of earlier versions) is still finished by
//! `rbd_snap_rollback` at open.

use std::collections::BTreeSet;
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

/// The revert clones of LUN image `anchor` are `anchor~<uuid>`: no LUN
/// image (they end in `.lun`) and no user name can take such a name, and
/// the scanner, which lists `*.lun`, never sees them.
fn clone_name(anchor: &str, top: Uuid) -> String {
    format!("{anchor}~{top}")
}

fn is_clone_of(anchor: &str, name: &str) -> bool {
    name.strip_prefix(anchor)
        .and_then(|r| r.strip_prefix('~'))
        .is_some_and(|u| Uuid::parse_str(u).is_ok())
}

/// Test hook: `LUNGATE_TEST_RBD_REVERT_KILL=STEP` ends the process at a
/// step of a revert (`cloned`: the clone exists, the manifest is the old
/// one; `committed`: the manifest names the clone, nothing is swapped).
fn kill_point(step: &str) {
    if std::env::var_os("LUNGATE_TEST_RBD_REVERT_KILL").is_some_and(|v| v == step) {
        std::process::exit(137);
    }
}

/// The image holding a LUN's live bytes, as the anchor's manifest names
/// it (`None`: the anchor itself). Read by whoever opens the LUN, before
/// its label.
pub fn live_image(anchor: &Image) -> io::Result<Option<String>> {
    let Some(v) = anchor.metadata_get(MANIFEST_KEY)? else {
        return Ok(None);
    };
    let bad = |why: String| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: manifest: {why}", anchor.name()),
        )
    };
    let b = unhex(&v).ok_or_else(|| bad("not hex".into()))?;
    let (m, _) = manifest::decode(&b).map_err(|why| bad(why.to_string()))?;
    Ok(m.live)
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
    /// The anchor (`NAME.lun`): the manifest, the ownership lock.
    image: Arc<Image>,
    /// The LUN's bytes (the live image is `obj.data()`).
    obj: Arc<RbdObject>,
    base: Arc<dyn Object>,
    lun: Uuid,
    size: u64,
    writable: bool,
    /// The manifest and its generation, as last read or committed.
    tree: Mutex<Option<(Manifest, u64)>>,
    /// The live layer a prepared revert will make (snapshot name, layer).
    next: Mutex<Option<(String, Uuid)>>,
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
            obj: base.clone(),
            base,
            location,
            spec,
            lun,
            size,
            writable,
            tree: Mutex::new(None),
            next: Mutex::new(None),
        };
        let loaded = store.load()?;
        // Whoever opened the bytes follows the manifest (`live_image`);
        // one that did not is made to here.
        let want = loaded
            .as_ref()
            .and_then(|(m, _)| m.live.clone())
            .unwrap_or_else(|| store.spec.image.clone());
        if store.obj.data().name() != want {
            let img = store.io(
                store.pool.open_image(&want, writable),
                "open the live image",
            )?;
            if writable {
                store.io(img.lock_acquire(), "take the live image's exclusive lock")?;
            }
            store.obj.swap_data(Arc::new(img));
        }
        *store.lock_tree() = loaded;
        let mut warnings = Vec::new();
        if writable {
            store.recover_tree(&mut warnings)?;
        }
        Ok((store, warnings))
    }

    /// The image the live bytes are in.
    fn live(&self) -> Arc<Image> {
        self.obj.data()
    }

    /// The image holding snapshot layer `layer`'s RBD snapshot.
    fn holder<'a>(&'a self, m: &'a Manifest, layer: Uuid) -> &'a str {
        m.images
            .get(&layer)
            .map_or(&self.spec.image, |s| s.as_str())
    }

    /// A writable handle on image `name` of the LUN: the anchor's or the
    /// live image's own, else a new one (an older revert clone, which no
    /// one else holds).
    fn handle(&self, name: &str) -> Result<Arc<Image>> {
        if name == self.spec.image {
            return Ok(self.image.clone());
        }
        let live = self.live();
        if live.name() == name {
            return Ok(live);
        }
        Ok(Arc::new(
            self.pool
                .open_image(name, true)
                .ctx(&self.sibling(name), "open RBD image")?,
        ))
    }

    /// Remove what the manifest `m` does not account for: images of ours
    /// it does not name (a clone a crash left before its commit, an old
    /// live image after it) and RBD snapshots of ours it needs for neither
    /// a snapshot nor a revert clone's parent. Idempotent; run at every
    /// read-write open and after every commit that drops something.
    fn sweep(&self, m: Option<&Manifest>, warnings: &mut Vec<String>) -> Result<()> {
        let empty = self.fresh();
        let m = m.unwrap_or(&empty);
        let anchor = self.spec.image.as_str();
        let live = self.live();
        let mut stale: Vec<String> = self
            .io(self.pool.list(), "list images")?
            .into_iter()
            .filter(|n| is_clone_of(anchor, n))
            .filter(|n| !m.forks.contains_key(n) && m.live.as_deref() != Some(n.as_str()))
            .filter(|n| n != live.name())
            .collect();
        // A clone of a stale clone goes first: a few passes.
        for _ in 0..4 {
            if stale.is_empty() {
                break;
            }
            let mut left = Vec::new();
            for n in stale {
                match remove_whole(&self.pool, &n) {
                    Ok(()) => warnings.push(format!(
                        "{}: removed RBD image {n}, which no manifest names (a revert's clone or a replaced live image)",
                        self.location.display()
                    )),
                    Err(e) => left.push((n, e)),
                }
            }
            stale = left.iter().map(|(n, _)| n.clone()).collect();
            if left
                .iter()
                .all(|(_, e)| e.raw_os_error() != Some(libc::EBUSY))
            {
                for (n, e) in left {
                    warnings.push(format!(
                        "{}: could not remove RBD image {n}, which no manifest names: {e}",
                        self.location.display()
                    ));
                }
                break;
            }
        }
        let pinned: BTreeSet<(String, Uuid)> = m
            .snapshots
            .iter()
            .map(|s| s.layer)
            .chain(m.forks.values().copied())
            .map(|l| (self.holder(m, l).to_string(), l))
            .collect();
        let mut ours: Vec<&str> = vec![anchor];
        ours.extend(m.forks.keys().map(String::as_str));
        if let Some(l) = &m.live {
            if !ours.contains(&l.as_str()) {
                ours.push(l);
            }
        }
        for name in ours {
            let img = self.handle(name)?;
            let loc = self.sibling(name);
            for s in self.io(img.snap_list(), "list snapshots")? {
                let Some(layer) = s
                    .strip_prefix(SNAP_PREFIX)
                    .and_then(|u| Uuid::parse_str(u).ok())
                else {
                    continue;
                };
                if pinned.contains(&(name.to_string(), layer)) {
                    continue;
                }
                if img.snap_is_protected(&s).unwrap_or(false) {
                    if let Err(e) = img.snap_unprotect(&s) {
                        warnings.push(format!(
                            "{}@{s}: kept a protected RBD snapshot the manifest does not name ({e})",
                            loc.display()
                        ));
                        continue;
                    }
                }
                self.io(img.snap_remove(&s), "remove orphan snapshot")?;
                warnings.push(format!(
                    "{}@{s}: removed an RBD snapshot no manifest named (a snapshot a crash interrupted)",
                    loc.display()
                ));
            }
        }
        Ok(())
    }

    /// [`sweep`](Self::sweep) after a commit: what it finds is expected
    /// garbage, logged, not an error of the operation that committed.
    fn sweep_after(&self, m: &Manifest) {
        let mut w = Vec::new();
        if let Err(e) = self.sweep(Some(m), &mut w) {
            tracing::warn!("{}: cleanup after a commit: {e}", self.location.display());
        }
        for w in w {
            tracing::debug!("{w}");
        }
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
            live: None,
            images: Default::default(),
            forks: Default::default(),
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
        let m = self.lock_tree().as_ref().map(|(m, _)| m.clone());
        self.sweep(m.as_ref(), warnings)
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

    /// Snapshots of image `img` in the order RBD took them (its snapshot
    /// ids), those of ours the manifest names only.
    fn time_order(&self, img: &Image, m: &Manifest) -> Result<Vec<Uuid>> {
        let listed = self.io(img.snap_list(), "list snapshots")?;
        Ok(listed
            .iter()
            .filter_map(|n| n.strip_prefix(SNAP_PREFIX))
            .filter_map(|u| Uuid::parse_str(u).ok())
            .filter(|u| m.snapshots.iter().any(|s| s.layer == *u))
            .collect())
    }

    /// Bytes `img` allocated since snapshot `from` (whole objects); a
    /// clone's parent counts only with `include_parent`.
    fn allocated(
        img: &Image,
        from: Option<&str>,
        size: u64,
        include_parent: bool,
    ) -> io::Result<u64> {
        Ok(img
            .diff_in(from, 0, size, true, include_parent)?
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
            // Its tree names where the bytes are: it must stay.
            Some((m, _)) if m.live.is_some() => {
                return Err(Error::Invalid(format!(
                    "{}: a revert made RBD image {} this LUN's live bytes (clone-and-swap); \
                     its manifest, which names that image and the LUN's size, must stay, so \
                     the LUN is not resized: clone a snapshot of it (`lunctl clone`), flatten the clone \
                     (`lunctl flatten`) and resize that",
                    self.location.display(),
                    m.live.as_deref().unwrap_or_default()
                )))
            }
            Some((m, _)) => {
                m.snapshots.is_empty()
                    && m.dependents.is_empty()
                    && m.flatten.is_none()
                    && m.live.is_none()
                    && m.forks.is_empty()
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
        let live = self.live();
        self.io(live.snap_create(&snap_name(frozen)), "create snapshot")?;
        if m.live.is_some() {
            m.images.insert(frozen, live.name().to_string());
        }
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
            let _ = live.snap_remove(&snap_name(frozen));
            return Err(e);
        }
        Ok(())
    }

    fn prepare_revert(&self, name: &str) -> Result<Uuid> {
        if let Some((m, _)) = self.lock_tree().as_ref() {
            Self::snap_layer(m, name)?;
        }
        let top = Uuid::new_v4();
        *self.next.lock().unwrap_or_else(|e| e.into_inner()) = Some((name.to_string(), top));
        Ok(top)
    }

    /// Clone-and-swap: the snapshot is cloned into a new image (given the
    /// `keep` bytes, the label), the manifest naming it live is committed
    /// (the one point of no return), then the volume's bytes are swapped
    /// to it and the image it replaces goes if nothing needs it. A few
    /// metadata operations, whatever the image's size.
    fn revert(&self, name: &str, keep: &[(u64, Vec<u8>)]) -> Result<()> {
        self.writable()?;
        let mut tree = self.lock_tree();
        let Some((mut m, _)) = tree.clone() else {
            return Err(Error::NoSnapshot(name.into()));
        };
        let target = Self::snap_layer(&m, name)?;
        let rbd_snap = snap_name(target);
        let holder = self.holder(&m, target).to_string();
        let h = self.handle(&holder)?;
        if !self.io(h.snap_is_protected(&rbd_snap), "check snapshot")? {
            self.io(h.snap_protect(&rbd_snap), "protect snapshot")?;
        }
        let prepared = self.next.lock().unwrap_or_else(|e| e.into_inner()).take();
        let top = match prepared {
            Some((n, t)) if n == name => t,
            _ => Uuid::new_v4(),
        };
        let clone = clone_name(&self.spec.image, top);
        let cloc = self.sibling(&clone);
        self.pool
            .clone_image(&self.pool, &holder, &rbd_snap, &clone)
            .ctx(&cloc, "rbd clone")?;
        kill_point("cloned");
        let prepared = (|| -> io::Result<Image> {
            let img = self.pool.open_image(&clone, true)?;
            img.lock_acquire()?;
            for key in INHERITED {
                img.metadata_remove(key)?;
            }
            for (at, b) in keep {
                img.write_at(b, *at)?;
            }
            img.flush()?;
            Ok(img)
        })();
        let img = match prepared {
            Ok(img) => img,
            Err(e) => {
                let _ = self.pool.remove(&clone);
                return Err(e).ctx(&cloc, "prepare the revert clone");
            }
        };
        let old = m.top;
        m.layers.retain(|l| l.id != old);
        m.layers.push(LayerRec {
            id: top,
            parent: self.parent_ref(target),
            created: now(),
        });
        m.top = top;
        m.live = Some(clone.clone());
        m.forks.insert(clone.clone(), target);
        gc(&mut m);
        prune(&mut m, &self.spec.image);
        if let Err(e) = self.commit(&mut tree, m.clone()) {
            drop(img);
            let _ = self.pool.remove(&clone);
            return Err(e);
        }
        kill_point("committed");
        drop(self.obj.swap_data(Arc::new(img)));
        drop(tree);
        self.sweep_after(&m);
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
        let holder = self.holder(&m, layer).to_string();
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
        prune(&mut m, &self.spec.image);
        // A revert clone still reading from it keeps it, hidden (RBD has
        // no clone-v1 way to drop a clone's parent): it goes with the
        // clone (a later revert, a flatten, the LUN's deletion).
        let hidden = m.forks.values().any(|l| *l == layer);
        let m2 = m.clone();
        self.commit(&mut tree, m)?;
        drop(tree);
        if !hidden {
            let h = self.handle(&holder)?;
            if self.io(h.snap_is_protected(&rbd_snap), "check snapshot")? {
                self.io(h.snap_unprotect(&rbd_snap), "unprotect snapshot")?;
            }
            self.io(h.snap_remove(&rbd_snap), "remove snapshot")?;
        }
        self.sweep_after(&m2);
        Ok(())
    }

    fn read_snapshot(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        let (layer, holder) = {
            let tree = self.lock_tree();
            let m = &tree
                .as_ref()
                .ok_or_else(|| Error::NoSnapshot(name.into()))?
                .0;
            let layer = Self::snap_layer(m, name)?;
            (layer, self.holder(m, layer).to_string())
        };
        let img = self.io(
            self.pool.open_snapshot(&holder, &snap_name(layer)),
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
        let holder = self.holder(&m, layer).to_string();
        let h = self.handle(&holder)?;
        if !self.io(h.snap_is_protected(&rbd_snap), "check snapshot")? {
            self.io(h.snap_protect(&rbd_snap), "protect snapshot")?;
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
            .clone_image(&self.pool, &holder, &rbd_snap, target)
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
            live: None,
            images: Default::default(),
            forks: Default::default(),
        };
        {
            let mut t = store.lock_tree();
            store.commit(&mut t, tm)?;
        }
        Ok(Arc::new(store))
    }

    fn flatten(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<()> {
        self.writable()?;
        let (parent, forked) = {
            let tree = self.lock_tree();
            let parent = tree.as_ref().and_then(|(m, _)| {
                m.layers.iter().find_map(|l| match &l.parent {
                    Parent::External { dir, id, .. } => Some((dir.clone(), *id)),
                    _ => None,
                })
            });
            // A revert clone reads from the snapshot it was cloned from.
            let forked = tree
                .as_ref()
                .is_some_and(|(m, _)| m.live.as_ref().is_some_and(|l| m.forks.contains_key(l)));
            (parent, forked)
        };
        if parent.is_none() && !forked {
            progress(self.size, self.size);
            return Ok(());
        }
        if parent.is_some() {
            // The anchor with its snapshots (deep-flatten), which every
            // revert clone of ours reads through.
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
        }
        if forked {
            let live = self.live();
            self.io(live.flatten(&mut *progress), "flatten the live image")?;
            let mut tree = self.lock_tree();
            if let Some((mut m, _)) = tree.clone() {
                m.forks.remove(live.name());
                prune(&mut m, &self.spec.image);
                self.commit(&mut tree, m.clone())?;
                drop(tree);
                self.sweep_after(&m);
            }
        }
        let Some((pdir, _)) = parent else {
            return Ok(());
        };
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
        let pa = self.lineage(&m, Some(a));
        let pb = self.lineage(&m, b);
        // The first image both points descend from (the anchor at worst).
        let (i, j) = pb
            .iter()
            .enumerate()
            .find_map(|(i, (img, _))| pa.iter().position(|(x, _)| x == img).map(|j| (i, j)))
            .ok_or_else(|| {
                corrupt(
                    &self.location,
                    format!("snapshots {from:?} and {to:?} share no image"),
                )
            })?;
        let (img, at_a) = &pa[j];
        let at_b = pb[i].1;
        let mut changes = self.diff_on(img, *at_a, at_b)?;
        if i == 0 && j == 0 {
            return Ok(changes);
        }
        // Across images: what the common image changed between the two
        // fork points, and what each clone on the way wrote itself. A
        // zeroed range may have been written on another image: everything
        // is data, read from `to`.
        for path in [&pa[..=j], &pb[..=i]] {
            for w in path.windows(2) {
                let ((img, at), (pimg, fork)) = (&w[0], &w[1]);
                let h = self.point(img, *at)?;
                let runs = self.io(h.diff_in(None, 0, self.size, false, false), "diff")?;
                let parent = self.point(pimg, *fork)?;
                let runs = runs.into_iter().map(|(o, l, _)| (o, l)).collect();
                changes.extend(self.differing(&h, &parent, runs)?);
            }
        }
        Ok(union_as_data(changes))
    }

    fn usage(&self) -> Result<Vec<LayerUsage>> {
        let m = self.manifest()?;
        let mut out = Vec::new();
        let live = self.live();
        let mut live_prev: Option<String> = None;
        if let Some(m) = &m {
            let mut images: Vec<String> = vec![self.spec.image.clone()];
            images.extend(m.forks.keys().cloned());
            if let Some(l) = &m.live {
                if !images.contains(l) {
                    images.push(l.clone());
                }
            }
            for name in images {
                let own = name != self.spec.image;
                let handle = self.handle(&name)?;
                let mut prev: Option<String> = None;
                for layer in self.time_order(&handle, m)? {
                    if self.holder(m, layer) != name {
                        continue;
                    }
                    let snap = snap_name(layer);
                    let img = self.io(self.pool.open_snapshot(&name, &snap), "open snapshot")?;
                    let bytes = self.io(
                        Self::allocated(&img, prev.as_deref(), self.size, !own),
                        "du",
                    )?;
                    out.push(LayerUsage {
                        layer,
                        path: PathBuf::from(format!("{}@{snap}", self.sibling(&name).display())),
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
                if name == live.name() {
                    live_prev = prev;
                }
            }
        }
        let own = live.name() != self.spec.image;
        let bytes = self.io(
            Self::allocated(&live, live_prev.as_deref(), self.size, !own),
            "du",
        )?;
        out.push(LayerUsage {
            layer: m.as_ref().map_or(self.lun, |m| m.top),
            path: if own {
                self.sibling(live.name())
            } else {
                self.location.clone()
            },
            snapshot: None,
            live: true,
            in_chain: true,
            external: false,
            allocated_bytes: bytes,
            disk_bytes: bytes,
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
        // The older revert clones, which no one else holds; the live one
        // and a snapshot a clone of ours reads from go with the anchor
        // ([`remove_image`], once the LUN is closed: librbd refuses to
        // remove an open image or a parent snapshot).
        let live = self.live();
        let m = self.manifest()?;
        for name in m.iter().flat_map(|m| m.forks.keys()) {
            if name != live.name() {
                let _ = remove_whole(&self.pool, name);
            }
        }
        for img in [live, self.image.clone()] {
            for s in self.io(img.snap_list(), "list snapshots")? {
                if img.snap_is_protected(&s).unwrap_or(false) && img.snap_unprotect(&s).is_err() {
                    continue;
                }
                self.io(img.snap_remove(&s), "remove snapshot")?;
            }
        }
        Ok(())
    }
}

impl RbdStore {
    /// A point in time (snapshot `layer`, `None`: the live bytes) as the
    /// images it lies on, nearest first: the image holding it, then each
    /// image the previous one was cloned from with the snapshot it was
    /// cloned from, up to the anchor.
    fn lineage(&self, m: &Manifest, layer: Option<Uuid>) -> Vec<(String, Option<Uuid>)> {
        let mut img = match layer {
            Some(l) => self.holder(m, l).to_string(),
            None => self.live().name().to_string(),
        };
        let mut out = vec![(img.clone(), layer)];
        while let Some(&fork) = m.forks.get(&img) {
            img = self.holder(m, fork).to_string();
            if out.iter().any(|(x, _)| *x == img) {
                break;
            }
            out.push((img.clone(), Some(fork)));
        }
        out
    }

    /// Image `img` at snapshot `at` (`None`: its head, the live bytes).
    fn point(&self, img: &str, at: Option<Uuid>) -> Result<Arc<Image>> {
        match at {
            None => self.handle(img),
            Some(l) => Ok(Arc::new(
                self.io(self.pool.open_snapshot(img, &snap_name(l)), "open snapshot")?,
            )),
        }
    }

    /// The diff on one image between two of its points (`None`: its head,
    /// the newest).
    fn diff_on(&self, img: &str, a: Option<Uuid>, b: Option<Uuid>) -> Result<Vec<Change>> {
        if a == b {
            return Ok(vec![]);
        }
        let handle = self.handle(img)?;
        // A fork point deleted as a snapshot is no longer in the tree, but
        // is still an RBD snapshot: by RBD's own order.
        let all: Vec<Uuid> = self
            .io(handle.snap_list(), "list snapshots")?
            .iter()
            .filter_map(|n| n.strip_prefix(SNAP_PREFIX))
            .filter_map(|u| Uuid::parse_str(u).ok())
            .collect();
        let pos = |u: Option<Uuid>| match u {
            None => usize::MAX,
            Some(u) => all.iter().position(|x| *x == u).unwrap_or(usize::MAX - 1),
        };
        // RBD diffs run forward in time; a diff towards an older point
        // lists the same extents, all as data (read from `to`).
        let (older, newer, forward) = if pos(a) <= pos(b) {
            (a, b, true)
        } else {
            (b, a, false)
        };
        let older = older.expect("the older of two distinct points is a snapshot");
        let h = self.point(img, newer)?;
        let runs = self.io(h.diff(Some(&snap_name(older)), 0, self.size, false), "diff")?;
        if img != self.spec.image {
            let old = self.point(img, Some(older))?;
            let runs = runs.into_iter().map(|(o, l, _)| (o, l)).collect();
            return self.differing(&h, &old, runs);
        }
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

    /// The 4 KiB blocks of `runs` whose bytes differ between `new` and
    /// `old`, as data. A revert clone's first write to an RBD object copies
    /// the whole object up from its parent, which RBD's diff then lists:
    /// on a revert clone, the listed ranges are compared (reading what a
    /// backup would read anyway), so a diff holds only what changed.
    fn differing(&self, new: &Image, old: &Image, runs: Vec<(u64, u64)>) -> Result<Vec<Change>> {
        const BLOCK: usize = 4096;
        const CHUNK: u64 = 1 << 20;
        let mut out: Vec<Change> = Vec::new();
        let (mut a, mut b) = (vec![0u8; CHUNK as usize], vec![0u8; CHUNK as usize]);
        for (o, l) in runs {
            let end = (o + l).min(self.size);
            let mut at = o;
            while at < end {
                let n = (end - at).min(CHUNK) as usize;
                self.io(new.read_at(&mut a[..n], at), "read for diff")?;
                self.io(old.read_at(&mut b[..n], at), "read for diff")?;
                for i in (0..n).step_by(BLOCK) {
                    let j = (i + BLOCK).min(n);
                    if a[i..j] == b[i..j] {
                        continue;
                    }
                    let off = at + i as u64;
                    match out.last_mut() {
                        Some(c) if c.offset + c.length == off => c.length += (j - i) as u64,
                        _ => out.push(Change {
                            offset: off,
                            length: (j - i) as u64,
                            kind: ChangeKind::Data,
                        }),
                    }
                }
                at += n as u64;
            }
        }
        Ok(out)
    }

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

/// Drop revert clones nothing needs from `m`: one is kept while it is the
/// live image, holds a snapshot the tree names, or is the parent of a
/// kept one; an image record is kept while its snapshot is named or a
/// kept clone was cloned from it.
fn prune(m: &mut Manifest, anchor: &str) {
    if m.live.as_deref() == Some(anchor) {
        m.live = None;
    }
    let holder = |m: &Manifest, l: Uuid| m.images.get(&l).cloned().unwrap_or(anchor.into());
    let mut kept: BTreeSet<String> = m.live.iter().cloned().collect();
    kept.extend(m.snapshots.iter().map(|s| holder(m, s.layer)));
    loop {
        let more: Vec<String> = m
            .forks
            .iter()
            .filter(|(img, _)| kept.contains(*img))
            .map(|(_, l)| holder(m, *l))
            .filter(|h| !kept.contains(h))
            .collect();
        if more.is_empty() {
            break;
        }
        kept.extend(more);
    }
    m.forks.retain(|img, _| kept.contains(img));
    let needed: BTreeSet<Uuid> = m
        .snapshots
        .iter()
        .map(|s| s.layer)
        .chain(m.forks.values().copied())
        .collect();
    m.images.retain(|l, _| needed.contains(l));
}

/// Extents as data, sorted, overlaps and neighbours merged.
fn union_as_data(mut v: Vec<Change>) -> Vec<Change> {
    v.sort_by_key(|c| c.offset);
    let mut out: Vec<Change> = Vec::new();
    for c in v {
        match out.last_mut() {
            Some(l) if c.offset <= l.offset + l.length => {
                l.length = l.length.max(c.offset + c.length - l.offset);
            }
            _ => out.push(Change {
                kind: ChangeKind::Data,
                ..c
            }),
        }
    }
    out
}

/// Remove image `name` of `pool` with its snapshots (none may have a
/// clone: librbd refuses with EBUSY, which the caller may retry once the
/// clone is gone).
fn remove_whole(pool: &Arc<Pool>, name: &str) -> io::Result<()> {
    {
        let img = pool.open_image(name, true)?;
        for s in img.snap_list()? {
            if img.snap_is_protected(&s)? {
                img.snap_unprotect(&s)?;
            }
            img.snap_remove(&s)?;
        }
    }
    pool.remove(name)
}

/// Remove the LUN image at `spec` and its revert clones (after
/// [`NativeTree::destroy`] and once every handle on them is closed).
pub fn remove_image(spec: &ImageSpec) -> io::Result<()> {
    let pool = Arc::new(Pool::open(&spec.pool)?);
    let mut left: Vec<String> = pool
        .list()?
        .into_iter()
        .filter(|n| is_clone_of(&spec.image, n))
        .collect();
    // Clones before their parents: a few passes.
    for _ in 0..8 {
        if left.is_empty() {
            break;
        }
        let mut again = Vec::new();
        for n in left {
            match remove_whole(&pool, &n) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => again.push(n),
                Err(e) => return Err(e),
            }
        }
        left = again;
    }
    remove_whole(&pool, &spec.image)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(snaps: &[(Uuid, &str)]) -> Manifest {
        Manifest {
            lun: Uuid::new_v4(),
            size: 1 << 30,
            cluster_size: 64 << 10,
            lun_path: PathBuf::from("vm.lun"),
            layers: vec![],
            top: Uuid::new_v4(),
            snapshots: snaps
                .iter()
                .map(|(l, n)| SnapRec {
                    name: (*n).into(),
                    layer: *l,
                    created: 0,
                    description: String::new(),
                })
                .collect(),
            dependents: vec![],
            flatten: None,
            retired: vec![],
            checksums: false,
            layouts: Default::default(),
            live: None,
            images: Default::default(),
            forks: Default::default(),
        }
    }

    fn ch(offset: u64, length: u64, kind: ChangeKind) -> Change {
        Change {
            offset,
            length,
            kind,
        }
    }

    #[test]
    fn the_union_of_diffs_merges_overlaps_and_neighbours_as_data() {
        let got = union_as_data(vec![
            ch(8192, 4096, ChangeKind::Data),
            ch(0, 4096, ChangeKind::Zero),
            ch(4096, 4096, ChangeKind::Data),
            ch(10240, 8192, ChangeKind::Data),
            ch(1 << 20, 4096, ChangeKind::Zero),
        ]);
        assert_eq!(
            got,
            vec![
                ch(0, 18432, ChangeKind::Data),
                ch(1 << 20, 4096, ChangeKind::Data)
            ]
        );
    }

    #[test]
    fn clone_names_are_the_anchors_and_never_a_lun_images() {
        let u = Uuid::new_v4();
        let n = clone_name("vm.lun", u);
        assert!(is_clone_of("vm.lun", &n));
        assert!(!is_clone_of("vm.lun", "vm.lun"));
        assert!(!is_clone_of("vm.lun", &format!("vm.lun~{u}.lun")));
        assert!(!is_clone_of("v.lun", &n));
        assert!(!n.ends_with(".lun"));
    }

    #[test]
    fn prune_keeps_the_live_clone_its_parents_and_holders_of_named_snapshots() {
        let (s1, s2, s3) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        // vm.lun@s1 -> c1 (holds s3) ; vm.lun@s2 -> c2 (old live) ; c1@s3 -> c3 (live)
        let mut m = manifest(&[(s1, "s1"), (s2, "s2"), (s3, "s3")]);
        m.images.insert(s3, "c1".into());
        m.forks.insert("c1".into(), s1);
        m.forks.insert("c2".into(), s2);
        m.forks.insert("c3".into(), s3);
        m.live = Some("c3".into());
        prune(&mut m, "vm.lun");
        assert_eq!(m.forks.keys().collect::<Vec<_>>(), ["c1", "c3"]);
        // s1 deleted: c1 still holds s3, the live clone's parent
        m.snapshots.retain(|s| s.layer != s1);
        m.snapshots.retain(|s| s.layer != s3);
        prune(&mut m, "vm.lun");
        assert_eq!(m.forks.keys().collect::<Vec<_>>(), ["c1", "c3"]);
        assert_eq!(m.images.get(&s3).map(String::as_str), Some("c1"));
        // the live clone flattened: nothing reads c1 any more
        m.forks.remove("c3");
        prune(&mut m, "vm.lun");
        assert!(m.forks.is_empty(), "{:?}", m.forks);
        assert!(m.images.is_empty());
        // back on the anchor: no live record
        m.live = Some("vm.lun".into());
        prune(&mut m, "vm.lun");
        assert_eq!(m.live, None);
    }
}
