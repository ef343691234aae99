//! [`Volume`]: the chain of layers behind one LUN and every operation on it.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use uuid::Uuid;

use super::error::{corrupt, Error, IoCtx, Result};
use super::header::{valid_cluster_size, Geometry, NAME_MAX};
use super::journal::{self, KIND_DATA, KIND_ZERO};
use super::layer::{holds_nothing, is_spare, Delta, Layer, Raw, PENDING_LIMIT};
use super::manifest::{self, Dependent, FlattenRec, LayerRec, Manifest, Parent, SnapRec};
use super::table::Table;
use super::{lock, read, write};
use crate::engine::{Extent, IoEngine};
use crate::progress::Progress;
use crate::store::file::{delta_path, parent_dir, peer_base, resolve_peer, FileObject, FileStore};
use crate::store::{Object, Store};

/// Cluster-lock shards; clusters `c` and `c + SHARDS` share a lock.
const SHARDS: usize = 1024;
/// Clusters a merge copies per step before letting tree-operation
/// waiters and guest I/O planning at the state lock.
const MERGE_BATCH: usize = 256;
/// Longest snapshot description kept in the manifest.
pub const DESCRIPTION_MAX: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VolumeOptions {
    /// Used when the layers directory is first created; afterwards the
    /// manifest's cluster size wins. A power of two, 4 KiB ..= 2 MiB.
    pub cluster_size: u32,
    /// Open without writing a byte anywhere: no manifest rewrite, no orphan
    /// removal, delta files opened read-only; every write and tree
    /// operation is refused with [`Error::ReadOnly`].
    pub read_only: bool,
}

impl Default for VolumeOptions {
    fn default() -> Self {
        VolumeOptions {
            cluster_size: 64 << 10,
            read_only: false,
        }
    }
}

/// Everything [`Volume::open`] needs to know about the LUN file.
#[derive(Debug, Clone)]
pub struct VolumeConfig {
    /// `POOL/NAME.lun`; the layers live in `POOL/NAME.layers/`.
    pub lun_path: PathBuf,
    /// The LUN file, opened read-write.
    pub file: Arc<File>,
    pub lun_uuid: Uuid,
    /// Virtual size: the LUN's byte range.
    pub size: u64,
    /// Byte ranges that are not layered (the label region): reads go to
    /// the LUN file itself, writes through the volume are refused.
    pub protected: Vec<Range<u64>>,
    pub options: VolumeOptions,
    /// The I/O engine the asynchronous data path runs on (the gateway's);
    /// without one, the asynchronous calls do their I/O inline.
    pub engine: Option<IoEngine>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SnapshotInfo {
    pub name: String,
    pub description: String,
    /// Unix seconds.
    pub created: u64,
    /// The nearest older snapshot on this snapshot's branch.
    pub parent: Option<String>,
    pub layer: Uuid,
    /// Whether the live volume descends directly from this snapshot.
    pub current: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LayerUsage {
    pub layer: Uuid,
    pub path: PathBuf,
    pub snapshot: Option<String>,
    /// The live, writable layer.
    pub live: bool,
    /// Part of the live chain.
    pub in_chain: bool,
    /// Belongs to another volume (this one is a clone of it).
    pub external: bool,
    /// Clusters the layer holds × cluster size (the whole size for a base).
    pub allocated_bytes: u64,
    /// Bytes its file occupies on disk.
    pub disk_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    Data,
    Zero,
}

/// One changed extent of a [`Volume::diff`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Change {
    pub offset: u64,
    pub length: u64,
    pub kind: ChangeKind,
}

// ----- the packed index entry ------------------------------------------
// bits 0-1 kind, 2-47 physical cluster, 48-63 layer slot; 0 = no layer
// above the root holds the cluster.

pub(super) fn pack(slot: u16, v: u64) -> u64 {
    debug_assert!(v < 1 << 48);
    ((slot as u64) << 48) | v
}
pub(super) fn slot_of(e: u64) -> u16 {
    (e >> 48) as u16
}
pub(super) fn val_of(e: u64) -> u64 {
    e & ((1 << 48) - 1)
}

pub(super) struct Node {
    pub(super) layer: Arc<Layer>,
    pub(super) parent: Option<u16>,
    /// Stored in this volume's layers directory (or its own base).
    pub(super) own: bool,
}

pub(super) struct State {
    /// No layers directory yet: the LUN file is the only, writable layer.
    pub(super) plain: bool,
    pub(super) manifest: Manifest,
    pub(super) generation: u64,
    pub(super) nodes: Vec<Option<Node>>,
    pub(super) by_id: HashMap<Uuid, u16>,
    pub(super) top: u16,
    /// Top first, root last.
    pub(super) chain: Vec<u16>,
    /// The live chain's merged map: which layer holds each cluster.
    pub(super) index: RwLock<Table>,
}

impl State {
    pub(super) fn node(&self, s: u16) -> &Node {
        self.nodes[s as usize].as_ref().expect("live slot")
    }
    pub(super) fn layer(&self, s: u16) -> &Layer {
        &self.node(s).layer
    }
    pub(super) fn delta(&self, s: u16) -> &Delta {
        self.layer(s).delta().expect("a delta layer")
    }
    fn add(&mut self, layer: Layer, parent: Option<u16>, own: bool) -> u16 {
        let id = layer.id();
        let node = Node {
            layer: Arc::new(layer),
            parent,
            own,
        };
        let slot = match self.nodes.iter().position(Option::is_none) {
            Some(i) => {
                self.nodes[i] = Some(node);
                i
            }
            None => {
                self.nodes.push(Some(node));
                self.nodes.len() - 1
            }
        } as u16;
        self.by_id.insert(id, slot);
        slot
    }
    fn remove(&mut self, s: u16) -> Option<Node> {
        let n = self.nodes[s as usize].take()?;
        self.by_id.remove(&n.layer.id());
        Some(n)
    }
    pub(super) fn chain_of(&self, s: u16) -> Vec<u16> {
        let mut v = vec![s];
        while let Some(p) = self.node(*v.last().expect("non-empty")).parent {
            v.push(p);
        }
        v
    }
    pub(super) fn root_raw(&self, chain: &[u16]) -> Option<&Raw> {
        match &*self.node(*chain.last()?).layer {
            Layer::Raw(r) => Some(r),
            Layer::Delta(_) => None,
        }
    }
    fn build_index(&self, chain: &[u16], clusters: u64) -> Table {
        let mut t = Table::new(clusters);
        for &s in chain.iter().rev() {
            if let Some(d) = self.layer(s).delta() {
                for (vc, v) in read(&d.map).iter() {
                    t.set(vc, pack(s, v));
                }
            }
        }
        t
    }
    /// Walk `chain` for the first layer holding `vc` (for views other than
    /// the live one: O(depth)).
    pub(super) fn walk(&self, chain: &[u16], vc: u64) -> u64 {
        for &s in chain {
            if let Some(d) = self.layer(s).delta() {
                let v = d.get(vc);
                if v != 0 {
                    return pack(s, v);
                }
            }
        }
        0
    }
    fn names(&self) -> HashMap<Uuid, &str> {
        self.manifest
            .snapshots
            .iter()
            .map(|s| (s.layer, s.name.as_str()))
            .collect()
    }
}

/// Marks a write's clusters dirty and counts it for flush grouping when
/// it returns (after its bytes landed; see [`super::dirty`]).
struct MarkOnDrop<'a>(&'a Volume, u64, u64);

impl Drop for MarkOnDrop<'_> {
    fn drop(&mut self) {
        self.0.mark_dirty(self.1, self.2);
        // Counted once done: a flush that starts meanwhile must not count
        // this write as made durable by its commit.
        self.0.durability.note_write();
    }
}

/// What a cluster resolves to, for comparisons.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Res {
    Zero,
    Raw(u16),
    Data(u16, u64),
}

pub struct Volume {
    pub(super) lun_path: PathBuf,
    /// The pool directory (the LUN file's): where clones and their parents
    /// are found by name and LUN UUID.
    pub(super) pool: PathBuf,
    pub(super) dir: PathBuf,
    pub(super) store: Arc<dyn Store>,
    pub(super) engine: Option<IoEngine>,
    pub(super) lun: Uuid,
    pub(super) geo: Geometry,
    pub(super) protected: Vec<Range<u64>>,
    pub(super) state: RwLock<State>,
    /// Per-cluster locks, shared by the synchronous and the asynchronous
    /// data path (see the module docs of [`super::io`]).
    pub(super) shards: Box<[async_lock::RwLock<()>]>,
    /// Held shared by every asynchronous request for its whole run and
    /// exclusively by the tree operations that change the live layer
    /// (snapshot, revert), which therefore never overtake a request.
    pub(super) io: async_lock::RwLock<()>,
    /// Writes completed and the newest known durable (flush grouping).
    pub(super) durability: super::io::Durability,
    /// Serialises the commits of concurrent asynchronous flushes, so the
    /// later ones can see they were covered by an earlier one.
    pub(super) commit_group: Mutex<()>,
    /// Dirty-cluster trackers (migration, incremental backup).
    pub(super) dirty: Arc<super::dirty::DirtySet>,
    pub(super) maint: Mutex<()>,
    /// A snapshot or revert switched in memory whose durable commit is
    /// still to do ([`Volume::switch_snapshot`], [`Volume::switch_revert`],
    /// [`Volume::finish_switch`]); held while it is done, so concurrent
    /// finishers wait for the first.
    pub(super) pending: Mutex<Option<PendingSwitch>>,
    /// Whether `pending` holds one; set under the state lock (written) by
    /// the switch, so a flush that reads it under the state lock knows
    /// which live layer its writes went to.
    pub(super) switch_pending: AtomicBool,
    /// The next live delta, made ahead by [`Volume::prepare_snapshot`] or
    /// [`Volume::prepare_revert`].
    pub(super) spare: Mutex<Option<Spare>>,
    pub(super) warnings: Mutex<Vec<String>>,
    pub(super) crashed: AtomicBool,
    pub(super) read_only: bool,
}

/// The durable half of a snapshot or revert switched in memory.
pub(super) struct PendingSwitch {
    /// The new live layer (the spare, its flag still set).
    new: Arc<Layer>,
    /// The manifest that names the new live delta (and the snapshot).
    manifest: Manifest,
    generation: u64,
    kind: Switch,
}

/// What a pending switch did to the layer that was live before it.
enum Switch {
    /// Froze it as snapshot `name`: its last writes are committed before
    /// the manifest.
    Snapshot {
        old: Arc<Layer>,
        name: String,
        description: String,
    },
    /// Discarded it (a revert): its file stays until the manifest that
    /// retires it is committed, so a crash before finds the LUN as it was.
    Revert { old: Arc<Layer> },
}

/// An empty delta made ahead on layer `parent` (the live layer for a
/// snapshot, the snapshot's layer for a revert): uncommitted (no manifest
/// names it) until a switch makes it the live layer; a crash leaves it to
/// the next open, which removes spares no manifest names.
pub(super) struct Spare {
    id: Uuid,
    parent: Uuid,
    created: u64,
    checksums: bool,
    delta: Delta,
    /// For a revert: the live index the switch installs (the chain below
    /// the spare, which is empty), built ahead.
    index: Option<Prebuilt>,
}

/// A live index built before the pause, valid while the tree it was built
/// from is unchanged (the same manifest generation and chain slots).
pub(super) struct Prebuilt {
    generation: u64,
    chain: Vec<u16>,
    table: Table,
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume")
            .field("lun_path", &self.lun_path)
            .field("lun", &self.lun)
            .field("size", &self.geo.size)
            .finish()
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// How a manifest names a file of the pool: by its name alone.
fn pool_name(p: &Path) -> PathBuf {
    PathBuf::from(p.file_name().unwrap_or(p.as_os_str()))
}

fn abs(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

fn validate_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > NAME_MAX || name.chars().any(char::is_control) {
        return Err(Error::Invalid(format!(
            "snapshot name {name:?} must be 1 to {NAME_MAX} bytes without control characters"
        )));
    }
    Ok(())
}

impl Volume {
    // ----- opening ---------------------------------------------------------

    /// Open the volume of a LUN: load the manifest and every layer of the
    /// chain, replaying journals. Without a layers directory this is a plain
    /// volume whose only layer is the LUN file.
    pub fn open(cfg: VolumeConfig) -> Result<Volume> {
        let store = crate::store::hook::wrapped(Arc::new(FileStore::new(
            &cfg.lun_path,
            cfg.file.clone(),
            cfg.engine.clone(),
            !cfg.options.read_only,
        )));
        Volume::open_in(store, cfg.into())
    }

    /// [`Volume::open`] on a store the caller made (a store other than
    /// the file store beside the LUN file: Ceph RBD).
    pub fn open_in(store: Arc<dyn Store>, cfg: super::native::StoreVolume) -> Result<Volume> {
        let read_only = cfg.options.read_only;
        let dir = store.location().to_path_buf();
        let pool = parent_dir(&cfg.lun_path);
        let mut warnings = Vec::new();
        if !read_only {
            warnings.extend(store.recover(cfg.lun_uuid)?);
        }
        let loaded = store.load_manifest()?;
        if loaded.is_none() && store.exists() {
            let layers = store.list_layers()?;
            if !layers.is_empty() {
                return Err(corrupt(
                    &dir,
                    format!(
                        "holds {} layer file(s) ({}) but no manifest (manifest.0 and manifest.1 are missing): the LUN's snapshots and everything written since the first one live in those layers, so it is not served; nothing was removed. `lunctl repair` rebuilds the manifest from the layers' headers",
                        layers.len(),
                        layers
                            .iter()
                            .map(|id| format!("{id}.delta"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
        }
        let cs = loaded
            .as_ref()
            .map_or(cfg.options.cluster_size, |l| l.manifest.cluster_size) as u64;
        if !valid_cluster_size(cs) {
            return Err(Error::Invalid(format!(
                "cluster size {cs} is not a power of two in 4096..=2097152"
            )));
        }
        // A manifest larger than the LUN says is a grow the owner's label
        // has not caught up with (see `grow`): the volume has that size.
        let size = loaded
            .as_ref()
            .map_or(cfg.size, |l| l.manifest.size.max(cfg.size));
        let geo = Geometry::new(cs, size).ok_or_else(|| {
            Error::Invalid(format!(
                "volume size {size} too large for cluster size {cs}"
            ))
        })?;
        if cfg.size == 0 {
            return Err(Error::Invalid("volume size 0".into()));
        }
        if let Some(r) = cfg
            .protected
            .iter()
            .find(|r| r.start >= r.end || r.end > cfg.size)
        {
            return Err(Error::Invalid(format!(
                "protected range {r:?} is empty or beyond the size {}",
                cfg.size
            )));
        }
        let home = Layer::Raw(Raw {
            id: cfg.lun_uuid,
            obj: store.base().clone(),
        });
        let mut st = State {
            plain: true,
            manifest: Manifest {
                lun: cfg.lun_uuid,
                size: cfg.size,
                cluster_size: cs as u32,
                lun_path: pool_name(&cfg.lun_path),
                layers: vec![],
                top: Uuid::nil(),
                snapshots: vec![],
                dependents: vec![],
                flatten: None,
                retired: vec![],
                checksums: false,
                layouts: Default::default(),
                live: None,
                images: Default::default(),
                forks: Default::default(),
            },
            generation: 0,
            nodes: vec![],
            by_id: HashMap::new(),
            top: 0,
            chain: vec![],
            index: RwLock::new(Table::new(0)),
        };
        st.add(home, None, true);
        if let Some(l) = loaded {
            let m = &l.manifest;
            if m.lun != cfg.lun_uuid || m.size < cfg.size {
                return Err(corrupt(
                    &dir,
                    format!(
                        "manifest is for LUN {} of {} bytes, not LUN {} of {} bytes",
                        m.lun, m.size, cfg.lun_uuid, cfg.size
                    ),
                ));
            }
            for rec in &m.layers {
                let obj = store.open_layer(rec.id, !read_only)?;
                let (d, w) = Delta::open(obj, rec.id, cfg.lun_uuid, geo)?;
                warnings.extend(w);
                // A crash between a switch's manifest commit and clearing
                // the new live layer's spare flag leaves the flag on a
                // layer the manifest names: harmless here, but `lunctl
                // repair` leaves spares out of the tree it rebuilds.
                if !read_only && d.header().spare() {
                    d.set_spare(false)?;
                    warnings.push(format!(
                        "{}: layer {} is named by the manifest but was still flagged spare (a crash right after a snapshot or revert committed); flag cleared",
                        dir.display(),
                        rec.id
                    ));
                }
                st.add(Layer::Delta(Box::new(d)), None, true);
            }
            for rec in &m.layers {
                let parent = match &rec.parent {
                    Parent::Base => Some(0),
                    Parent::None => None,
                    Parent::Layer { id } => Some(st.by_id[id]),
                    Parent::External { dir: xdir, id, lun } => Some(resolve_external(
                        &mut st,
                        &pool,
                        xdir,
                        *lun,
                        *id,
                        geo,
                        cfg.engine.as_ref(),
                        &mut warnings,
                        0,
                    )?),
                };
                let s = st.by_id[&rec.id];
                st.nodes[s as usize].as_mut().expect("just added").parent = parent;
            }
            st.top = st.by_id[&m.top];
            st.plain = false;
            st.generation = l.generation;
            st.manifest = l.manifest.clone();
            if !l.warnings.is_empty() {
                warnings.extend(l.warnings.iter().map(|w| format!("{}: {w}", dir.display())));
                if !read_only {
                    store.commit_manifest(&st.manifest, st.generation)?;
                }
            }
        }
        if store.exists() && !read_only {
            remove_orphans(&*store, &st.manifest, &mut warnings)?;
        }
        st.chain = st.chain_of(st.top);
        *st.index.get_mut().unwrap_or_else(|e| e.into_inner()) =
            st.build_index(&st.chain, geo.clusters);
        for w in &warnings {
            tracing::warn!("{w}");
        }
        Ok(Volume {
            lun_path: cfg.lun_path,
            pool,
            dir,
            store,
            engine: cfg.engine,
            lun: cfg.lun_uuid,
            geo,
            protected: cfg.protected,
            state: RwLock::new(st),
            shards: (0..SHARDS).map(|_| async_lock::RwLock::new(())).collect(),
            io: async_lock::RwLock::new(()),
            durability: Default::default(),
            commit_group: Mutex::new(()),
            dirty: Default::default(),
            maint: Mutex::new(()),
            pending: Mutex::new(None),
            switch_pending: AtomicBool::new(false),
            spare: Mutex::new(None),
            warnings: Mutex::new(warnings),
            crashed: AtomicBool::new(false),
            read_only,
        })
    }

    /// Start tracking which clusters of the live volume change (see
    /// [`super::dirty`]); stops when the tracker is dropped.
    pub fn track_dirty(&self) -> super::dirty::DirtyTracker {
        self.dirty.start(self.geo.size, self.geo.cluster_size)
    }

    /// Mark the clusters of `[offset, offset + len)` changed.
    pub(super) fn mark_dirty(&self, offset: u64, len: u64) {
        if len > 0 {
            let cs = self.geo.cluster_size;
            self.dirty.mark(offset / cs, (offset + len - 1) / cs);
        }
    }

    /// The I/O engine of the asynchronous data path, if any.
    pub fn engine(&self) -> Option<&IoEngine> {
        self.engine.as_ref()
    }

    /// The LUN's own bytes (the base of every chain of this volume).
    pub(super) fn home(&self) -> &Arc<dyn Object> {
        self.store.base()
    }

    /// Flush and close.
    pub fn close(self) -> Result<()> {
        self.flush()
    }

    /// Another process owns the volume now (a planned handover, after this
    /// one flushed it): closing it writes nothing, since the store would
    /// refuse the write.
    pub fn disown(&self) {
        self.crashed.store(true, Ordering::SeqCst);
    }

    /// Drop without flushing, as a crash would (tests only).
    #[doc(hidden)]
    pub fn crash(self) {
        self.crashed.store(true, Ordering::SeqCst);
    }

    pub fn size(&self) -> u64 {
        self.geo.size
    }
    /// Byte ranges not layered (label, GPT): read from the LUN file,
    /// refused for writes.
    pub fn protected(&self) -> &[Range<u64>] {
        &self.protected
    }
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }
    /// Whether the volume has a layers directory (any snapshot, clone or
    /// layer); a plain volume is the LUN file alone.
    pub fn is_layered(&self) -> bool {
        if let Some(t) = self.native() {
            return t.manifest().is_ok_and(|m| m.is_some());
        }
        !read(&self.state).plain
    }
    /// The LUN UUID the volume belongs to.
    pub fn lun_uuid(&self) -> Uuid {
        self.lun
    }
    /// Other volumes (clones) whose chains pass through our layers, by
    /// layers directory; only those whose manifests still reach into ours.
    pub fn dependents(&self) -> Vec<PathBuf> {
        if let Some(t) = self.native() {
            return t.dependents();
        }
        let st = read(&self.state);
        let me = abs(&self.dir);
        st.manifest
            .dependents
            .iter()
            .filter(|d| dependent_alive(&self.pool, self.lun, &me, d))
            .map(|d| {
                resolve_peer(&self.pool, &d.dir, Some(d.lun)).unwrap_or_else(|_| d.dir.clone())
            })
            .collect()
    }

    pub(super) fn writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly(self.lun_path.clone()));
        }
        Ok(())
    }
    pub fn cluster_size(&self) -> u64 {
        self.geo.cluster_size
    }
    pub fn lun_path(&self) -> &Path {
        &self.lun_path
    }
    pub fn layers_dir(&self) -> &Path {
        &self.dir
    }
    /// Problems found at open that did not stop it (a damaged header or
    /// manifest slot that the other slot covered).
    pub fn warnings(&self) -> Vec<String> {
        lock(&self.warnings).clone()
    }
    /// Layers in the live chain, top first.
    /// The live layer: the first of the chain, or the live layer of a
    /// store's own tree (what [`Volume::prepare_revert`] names).
    pub fn live_layer(&self) -> Option<Uuid> {
        if let Some(t) = self.native() {
            return t.manifest().ok().flatten().map(|m| m.top);
        }
        self.chain().first().copied()
    }

    pub fn chain(&self) -> Vec<Uuid> {
        let st = read(&self.state);
        st.chain.iter().map(|&s| st.layer(s).id()).collect()
    }
    /// Which layer holds the cluster at `offset`, by one index lookup
    /// (never a chain walk), and whether it holds data (`false`: zeros).
    pub fn locate(&self, offset: u64) -> Option<(Uuid, bool)> {
        let st = read(&self.state);
        let vc = offset / self.geo.cluster_size;
        if vc >= self.geo.clusters {
            return None;
        }
        let e = read(&st.index).get(vc);
        if e == 0 {
            return st.root_raw(&st.chain).map(|r| (r.id, true));
        }
        Some((
            st.layer(slot_of(e)).id(),
            journal::kind(val_of(e)) == KIND_DATA,
        ))
    }
    /// Entries and level-2 pages of the live index.
    pub fn index_stats(&self) -> (usize, usize) {
        let st = read(&self.state);
        let t = read(&st.index);
        (t.count(), t.pages())
    }

    // ----- helpers ----------------------------------------------------------

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.geo.size => Ok(()),
            _ => Err(Error::OutOfBounds {
                offset,
                len,
                size: self.geo.size,
            }),
        }
    }

    fn check_writable(&self, offset: u64, len: u64) -> Result<()> {
        self.writable()?;
        self.check(offset, len)?;
        if let Some(r) = self
            .protected
            .iter()
            .find(|r| len > 0 && offset < r.end && r.start < offset + len)
        {
            return Err(Error::Protected {
                offset,
                len,
                start: r.start,
                end: r.end,
            });
        }
        Ok(())
    }

    pub(super) fn cluster_len(&self, vc: u64) -> usize {
        let cs = self.geo.cluster_size;
        (self.geo.size - vc * cs).min(cs) as usize
    }

    /// Whether cluster `vc` lies wholly inside one protected range (a
    /// diff never reports it).
    fn cluster_protected(&self, vc: u64) -> bool {
        let start = vc * self.geo.cluster_size;
        let end = start + self.cluster_len(vc) as u64;
        self.protected
            .iter()
            .any(|r| r.start <= start && end <= r.end)
    }

    /// Split `[offset, offset+len)` into `(start, end, protected)` runs.
    pub(super) fn segments(&self, offset: u64, len: u64) -> Vec<(u64, u64, bool)> {
        let end = offset + len;
        let mut cuts: Vec<(u64, u64)> = self
            .protected
            .iter()
            .filter(|r| r.start < end && offset < r.end)
            .map(|r| (r.start.max(offset), r.end.min(end)))
            .collect();
        cuts.sort_unstable();
        let mut out = Vec::new();
        let mut at = offset;
        for (s, e) in cuts {
            if s > at {
                out.push((at, s, false));
            }
            out.push((s.max(at), e, true));
            at = at.max(e);
        }
        if at < end {
            out.push((at, end, false));
        }
        out
    }

    /// `(cluster, offset in cluster, start, end)` pieces of `[start, end)`.
    pub(super) fn pieces(
        &self,
        start: u64,
        end: u64,
    ) -> impl Iterator<Item = (u64, u64, u64, u64)> {
        let cs = self.geo.cluster_size;
        let mut at = start;
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let vc = at / cs;
            let e = ((vc + 1) * cs).min(end);
            let p = (vc, at - vc * cs, at, e);
            at = e;
            Some(p)
        })
    }

    pub(super) fn shard(&self, vc: u64) -> &async_lock::RwLock<()> {
        &self.shards[(vc % SHARDS as u64) as usize]
    }

    /// Read what entry `e` (from the index or a walk) says cluster `vc`
    /// holds, from `in_off`, with `root` the chain's raw base if any.
    fn read_entry(
        &self,
        st: &State,
        root: Option<&Raw>,
        e: u64,
        vc: u64,
        in_off: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        if e == 0 {
            match root {
                Some(r) => r
                    .obj
                    .read_at(buf, vc * self.geo.cluster_size + in_off)
                    .ctx(r.obj.name(), "read base"),
                None => {
                    buf.fill(0);
                    Ok(())
                }
            }
        } else {
            let v = val_of(e);
            match journal::kind(v) {
                KIND_DATA => st.delta(slot_of(e)).read_checked(
                    vc,
                    journal::phys(v),
                    self.cluster_len(vc),
                    in_off,
                    buf,
                ),
                _ => {
                    buf.fill(0);
                    Ok(())
                }
            }
        }
    }

    fn resolve(&self, st: &State, chain: &[u16], vc: u64) -> Res {
        let e = st.walk(chain, vc);
        if e == 0 {
            return match st.root_raw(chain) {
                Some(_) => Res::Raw(*chain.last().expect("non-empty")),
                None => Res::Zero,
            };
        }
        match journal::kind(val_of(e)) {
            KIND_DATA => Res::Data(slot_of(e), val_of(e)),
            _ => Res::Zero,
        }
    }

    // ----- data path --------------------------------------------------------

    /// Read `buf.len()` bytes at `offset` of the live volume.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check(offset, buf.len() as u64)?;
        let st = read(&self.state);
        let chain = st.chain.clone();
        self.read_view(&st, &chain, true, offset, buf)
    }

    /// Read from snapshot `name` (a frozen view; O(depth) per cluster).
    pub fn read_snapshot(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check(offset, buf.len() as u64)?;
        if let Some(t) = self.native() {
            return t.read_snapshot(name, offset, buf);
        }
        let st = read(&self.state);
        let rec = self.snap(&st, name)?;
        let chain = st.chain_of(st.by_id[&rec.layer]);
        self.read_view(&st, &chain, false, offset, buf)
    }

    fn read_view(
        &self,
        st: &State,
        chain: &[u16],
        live: bool,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        if st.plain {
            return self.home().read_at(buf, offset).ctx(&self.lun_path, "read");
        }
        let root = st.root_raw(chain);
        for (s, e, protected) in self.segments(offset, buf.len() as u64) {
            let b = &mut buf[(s - offset) as usize..(e - offset) as usize];
            if protected {
                self.home()
                    .read_at(b, s)
                    .ctx(&self.lun_path, "read label region")?;
                continue;
            }
            for (vc, in_off, ps, pe) in self.pieces(s, e) {
                let pb = &mut b[(ps - s) as usize..(pe - s) as usize];
                let _g = self.shard(vc).read_blocking();
                let ent = if live {
                    read(&st.index).get(vc)
                } else {
                    st.walk(chain, vc)
                };
                self.read_entry(st, root, ent, vc, in_off, pb)?;
            }
        }
        Ok(())
    }

    /// Write `data` at `offset`. Durable after the next [`Volume::flush`].
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_writable(offset, data.len() as u64)?;
        let _mark = MarkOnDrop(self, offset, data.len() as u64);
        let st = read(&self.state);
        if st.plain {
            return self
                .home()
                .write_at(data, offset)
                .ctx(&self.lun_path, "write");
        }
        for (vc, in_off, ps, pe) in self.pieces(offset, offset + data.len() as u64) {
            let d = &data[(ps - offset) as usize..(pe - offset) as usize];
            self.write_piece(&st, vc, in_off, d)?;
        }
        self.maybe_commit(&st)
    }

    fn maybe_commit(&self, st: &State) -> Result<()> {
        let top = st.delta(st.top);
        if top.pending_len() > PENDING_LIMIT {
            self.commit_layer(top)?;
        }
        Ok(())
    }

    fn write_piece(&self, st: &State, vc: u64, in_off: u64, data: &[u8]) -> Result<()> {
        let top = st.delta(st.top);
        let _g = self.shard(vc).write_blocking();
        let e = read(&st.index).get(vc);
        if e != 0
            && slot_of(e) == st.top
            && journal::kind(val_of(e)) == KIND_DATA
            && top.in_place_ok(vc)
        {
            return top.write_data(journal::phys(val_of(e)), in_off, data);
        }
        let clen = self.cluster_len(vc);
        let p = top.alloc();
        let r = if in_off == 0 && data.len() == clen {
            top.write_data(p, 0, data)
        } else {
            let mut buf = vec![0u8; clen];
            self.read_entry(st, st.root_raw(&st.chain), e, vc, 0, &mut buf)
                .and_then(|()| {
                    buf[in_off as usize..in_off as usize + data.len()].copy_from_slice(data);
                    top.write_data(p, 0, &buf)
                })
        };
        if let Err(err) = r {
            top.unalloc(p);
            return Err(err);
        }
        top.set_entry(vc, journal::data(p));
        write(&st.index).set(vc, pack(st.top, journal::data(p)));
        Ok(())
    }

    /// Make a whole cluster read as zeros in the top layer.
    fn zero_cluster(&self, st: &State, vc: u64) {
        let _g = self.shard(vc).write_blocking();
        let mut idx = write(&st.index);
        let e = idx.get(vc);
        let reads_zero = if e == 0 {
            st.root_raw(&st.chain).is_none()
        } else {
            journal::kind(val_of(e)) == KIND_ZERO
        };
        if reads_zero {
            return;
        }
        st.delta(st.top).set_entry(vc, journal::ZERO);
        idx.set(vc, pack(st.top, journal::ZERO));
    }

    /// Make `[offset, offset+len)` read as zeros. With `may_trim`, whole
    /// clusters are deallocated (a zero entry that shadows older layers);
    /// partial clusters, and everything without `may_trim`, are written.
    pub fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> Result<()> {
        self.check_writable(offset, len)?;
        let _mark = MarkOnDrop(self, offset, len);
        let st = read(&self.state);
        if st.plain {
            if may_trim {
                return self
                    .home()
                    .zero_range(offset, len)
                    .ctx(&self.lun_path, "punch");
            }
            let zeros = vec![0u8; (1 << 20).min(len as usize)];
            let mut at = offset;
            while at < offset + len {
                let n = (offset + len - at).min(zeros.len() as u64) as usize;
                self.home()
                    .write_at(&zeros[..n], at)
                    .ctx(&self.lun_path, "write zeros")?;
                at += n as u64;
            }
            return Ok(());
        }
        let zeros = vec![0u8; self.geo.cluster_size as usize];
        for (vc, in_off, ps, pe) in self.pieces(offset, offset + len) {
            let n = (pe - ps) as usize;
            if may_trim && in_off == 0 && n == self.cluster_len(vc) {
                self.zero_cluster(&st, vc);
            } else {
                self.write_piece(&st, vc, in_off, &zeros[..n])?;
            }
        }
        self.maybe_commit(&st)
    }

    /// Deallocate `[offset, offset+len)`; it reads back as zeros.
    pub fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len, true)
    }

    /// After this returns, every write acknowledged before it survives a crash.
    pub fn flush(&self) -> Result<()> {
        loop {
            let st = read(&self.state);
            // Writes before a switch went to the layer it froze: that
            // layer's commit and the manifest come first.
            if !self.switch_pending.load(Ordering::Acquire) {
                return self.flush_locked(&st);
            }
            drop(st);
            self.finish_switch()?;
        }
    }

    pub(super) fn flush_locked(&self, st: &State) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        if st.plain {
            self.home().sync().ctx(&self.lun_path, "fdatasync")
        } else {
            self.commit_layer(st.delta(st.top))
        }
    }

    /// Commit layer `d` of this volume: checksums are taken under the
    /// shards' locks (see [`Delta::commit_guarded`]).
    pub(super) fn commit_layer(&self, d: &Delta) -> Result<()> {
        d.commit_guarded(|vc| self.shard(vc).try_read())
    }

    /// Data and hole extents of the live view covering `[offset, offset+len)`
    /// (for NBD `base:allocation`). A hole always reads as zeros; zeros may
    /// also be reported as data.
    pub fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.check(offset, len)?;
        let st = read(&self.state);
        let mut runs: Vec<(u64, u64, bool)> = Vec::new();
        let mut push = |s: u64, e: u64, data: bool| {
            if s >= e {
                return;
            }
            if let Some(last) = runs.last_mut() {
                if last.1 == s && last.2 == data {
                    last.1 = e;
                    return;
                }
            }
            runs.push((s, e, data));
        };
        let raw_extents =
            |obj: &Arc<dyn Object>, s: u64, e: u64| -> Result<Vec<(u64, u64, bool)>> {
                let mut out = Vec::new();
                let mut at = s;
                for (o, l) in obj.data_extents(s, e).ctx(obj.name(), "SEEK_DATA")? {
                    out.push((at, o, false));
                    out.push((o, o + l, true));
                    at = o + l;
                }
                out.push((at, e, false));
                Ok(out)
            };
        if st.plain {
            for (s, e, d) in raw_extents(self.home(), offset, offset + len)? {
                push(s, e, d);
            }
        } else {
            let root = st.root_raw(&st.chain);
            let idx = read(&st.index);
            for (s, e, protected) in self.segments(offset, len) {
                if protected {
                    push(s, e, true);
                    continue;
                }
                let mut raw_run: Option<(u64, u64)> = None;
                for (vc, _, ps, pe) in self.pieces(s, e) {
                    let ent = idx.get(vc);
                    if ent == 0 && root.is_some() {
                        raw_run = match raw_run {
                            Some((a, _)) => Some((a, pe)),
                            None => Some((ps, pe)),
                        };
                        continue;
                    }
                    if let (Some((a, b)), Some(r)) = (raw_run.take(), root) {
                        for (x, y, d) in raw_extents(&r.obj, a, b)? {
                            push(x, y, d);
                        }
                    }
                    let data = ent != 0 && journal::kind(val_of(ent)) == KIND_DATA;
                    push(ps, pe, data);
                }
                if let (Some((a, b)), Some(r)) = (raw_run.take(), root) {
                    for (x, y, d) in raw_extents(&r.obj, a, b)? {
                        push(x, y, d);
                    }
                }
            }
        }
        Ok(runs
            .into_iter()
            .map(|(s, e, data)| Extent {
                offset: s,
                length: e - s,
                data,
            })
            .collect())
    }

    // ----- tree operations --------------------------------------------------

    fn snap<'a>(&self, st: &'a State, name: &str) -> Result<&'a SnapRec> {
        if st.plain {
            return Err(Error::NoSnapshot(name.into()));
        }
        st.manifest
            .snapshot(name)
            .ok_or_else(|| Error::NoSnapshot(name.into()))
    }

    pub(super) fn parent_ref(&self, id: Uuid) -> Parent {
        if id == self.lun {
            Parent::Base
        } else {
            Parent::Layer { id }
        }
    }

    pub(super) fn commit(&self, st: &mut State, mut m: Manifest) -> Result<()> {
        // A retired layer stays listed until its object is gone for certain.
        m.retired.retain(|id| self.store.has_layer(*id));
        let next = st.generation.checked_add(1).ok_or_else(|| {
            corrupt(
                self.store.location(),
                format!("manifest generation {} cannot advance", st.generation),
            )
        })?;
        self.store.commit_manifest(&m, next)?;
        st.manifest = m;
        st.generation = next;
        Ok(())
    }

    /// A new delta of this volume; it keeps data checksums when the
    /// volume does (the manifest says so).
    fn new_delta(&self, st: &State, id: Uuid, parent: Uuid, created: u64) -> Result<Delta> {
        let checksums = !st.plain && st.manifest.checksums;
        Delta::create(
            &*self.store,
            id,
            parent,
            self.lun,
            self.geo,
            created,
            checksums,
        )
    }

    /// Freeze the live layer as snapshot `name` and continue in a new empty
    /// delta. O(1): one flush, one empty layer, one manifest commit (the
    /// first one also publishes the store's layers; see [`Store`]). The
    /// three phases of a live snapshot in one call: [`Volume::prepare_snapshot`],
    /// [`Volume::switch_snapshot`], [`Volume::finish_switch`].
    pub fn snapshot(&self, name: &str, description: &str) -> Result<SnapshotInfo> {
        self.prepare_snapshot()?;
        let info = self.switch_snapshot(name, description)?;
        self.finish_switch()?;
        Ok(info)
    }

    /// The maintenance lock, with a switched snapshot made durable first:
    /// every tree operation starts from a committed manifest.
    pub(super) fn maintenance(&self) -> Result<std::sync::MutexGuard<'_, ()>> {
        let g = lock(&self.maint);
        self.finish_switch()?;
        Ok(g)
    }

    /// Phase one of a live snapshot, before the guests are paused: flush
    /// the live layer (so what is left to make durable later is only what
    /// the last requests wrote) and make the next live delta ahead (its
    /// file created and synced). A plain volume makes nothing: its first
    /// snapshot publishes the store and is done whole by the switch.
    pub fn prepare_snapshot(&self) -> Result<()> {
        self.writable()?;
        let _m = self.maintenance()?;
        self.flush()?;
        // A store with its own snapshots (RBD) makes them whole at the switch.
        if self.native().is_some() {
            return Ok(());
        }
        let st = read(&self.state);
        if st.plain {
            return Ok(());
        }
        let parent = st.layer(st.top).id();
        let checksums = st.manifest.checksums;
        let mut spare = lock(&self.spare);
        if spare
            .as_ref()
            .is_some_and(|s| s.parent == parent && s.checksums == checksums)
        {
            return Ok(());
        }
        self.drop_spare(&mut spare);
        *spare = Some(self.make_spare(&st, parent)?);
        Ok(())
    }

    /// A new empty delta on layer `parent`, flagged spare (synced), named
    /// by no manifest yet.
    fn make_spare(&self, st: &State, parent: Uuid) -> Result<Spare> {
        let id = Uuid::new_v4();
        let created = now();
        let delta = self.new_delta(st, id, parent, created)?;
        if let Err(e) = delta.set_spare(true) {
            drop(delta);
            let _ = self.store.remove_layer(id);
            return Err(e);
        }
        Ok(Spare {
            id,
            parent,
            created,
            checksums: delta.checksums(),
            delta,
            index: None,
        })
    }

    /// Remove a spare delta nothing will use.
    pub(super) fn drop_spare(&self, spare: &mut Option<Spare>) {
        if let Some(s) = spare.take() {
            drop(s.delta);
            if let Err(e) = self.store.remove_layer(s.id) {
                tracing::warn!(
                    "{}: unused spare layer {} not removed: {e}",
                    self.lun_path.display(),
                    s.id
                );
            }
        }
    }

    /// Phase two, while the guests are paused: the live layer becomes
    /// snapshot `name` and the spare delta the live layer, in memory; no
    /// byte is written. Until [`Volume::finish_switch`] has committed it,
    /// a crash forgets the snapshot and what was written since (none of
    /// it flushed: every flush, FUA write and tree operation finishes the
    /// switch first). Without a matching spare (a plain volume's first
    /// snapshot, or no [`Volume::prepare_snapshot`]) and on a store with
    /// its own snapshots (RBD) the snapshot is made whole and durable here.
    pub fn switch_snapshot(&self, name: &str, description: &str) -> Result<SnapshotInfo> {
        self.writable()?;
        validate_name(name)?;
        if description.len() > DESCRIPTION_MAX {
            return Err(Error::Invalid(format!(
                "description of {} bytes exceeds {DESCRIPTION_MAX}",
                description.len()
            )));
        }
        if let Some(t) = self.native() {
            return self.native_snapshot(t, name, description);
        }
        let _m = self.maintenance()?;
        let _io = self.io.write_blocking();
        let mut st = write(&self.state);
        if !st.plain && st.manifest.snapshot(name).is_some() {
            return Err(Error::SnapshotExists(name.into()));
        }
        let mut spare = lock(&self.spare);
        let ready = !st.plain
            && spare.as_ref().is_some_and(|s| {
                s.parent == st.layer(st.top).id() && s.checksums == st.manifest.checksums
            });
        if !ready {
            self.drop_spare(&mut spare);
            drop(spare);
            self.flush_locked(&st)?;
            if st.plain {
                self.layers_have_a_home("snapshots")?;
            }
            self.push_top(&mut st, Some((name, description)), false)?;
            return Ok(self.info(&st, name).expect("just made"));
        }
        let sp = spare.take().expect("checked above");
        drop(spare);
        let generation = st.generation.checked_add(1).ok_or_else(|| {
            corrupt(
                self.store.location(),
                format!("manifest generation {} cannot advance", st.generation),
            )
        })?;
        let old_top = st.top;
        let old_id = st.layer(old_top).id();
        let mut m = st.manifest.clone();
        m.layers.push(LayerRec {
            id: sp.id,
            parent: self.parent_ref(old_id),
            created: sp.created,
        });
        m.top = sp.id;
        m.snapshots.push(SnapRec {
            name: name.into(),
            layer: old_id,
            created: sp.created,
            description: description.into(),
        });
        m.flatten = None;
        let old = st.node(old_top).layer.clone();
        st.manifest = m.clone();
        st.generation = generation;
        let slot = st.add(Layer::Delta(Box::new(sp.delta)), Some(old_top), true);
        st.top = slot;
        st.chain.insert(0, slot);
        *lock(&self.pending) = Some(PendingSwitch {
            new: st.node(slot).layer.clone(),
            manifest: m,
            generation,
            kind: Switch::Snapshot {
                old,
                name: name.into(),
                description: description.into(),
            },
        });
        self.switch_pending.store(true, Ordering::Release);
        Ok(self.info(&st, name).expect("just made"))
    }

    /// Phase three, after the guests go on: make a switched snapshot or
    /// revert durable, in order: for a snapshot the frozen layer's last
    /// writes; the manifest naming the new live delta (the commit point);
    /// for a snapshot the frozen flag in the old layer's header; the spare
    /// flag cleared; for a revert the discarded layer's file removed and
    /// the layers nothing needs any more collected. Nothing to do without
    /// a switch; a failed commit stays pending and every later flush tries
    /// it again (and fails until it succeeds).
    pub fn finish_switch(&self) -> Result<()> {
        let mut p = lock(&self.pending);
        let Some(job) = p.as_mut() else {
            return Ok(());
        };
        if let Switch::Snapshot { old, .. } = &job.kind {
            self.commit_layer(old.delta().expect("a switch freezes a delta"))?;
        }
        job.manifest.retired.retain(|id| self.store.has_layer(*id));
        self.store.commit_manifest(&job.manifest, job.generation)?;
        if let Switch::Snapshot {
            old,
            name,
            description,
        } = &job.kind
        {
            let d = old.delta().expect("a switch freezes a delta");
            if let Err(e) = d.set_frozen(name, description) {
                tracing::warn!(
                    "snapshot {name}: frozen flag not recorded in the layer header: {e}"
                );
            }
        }
        // Named by the manifest now: no longer a spare an open may remove.
        job.new
            .delta()
            .expect("the spare is a delta")
            .set_spare(false)?;
        let job = p.take().expect("checked above");
        self.switch_pending.store(false, Ordering::Release);
        drop(p);
        if let Switch::Revert { old } = job.kind {
            let old_id = old.id();
            drop(old);
            // Retired by the committed manifest; one a failed removal
            // leaves stays listed there and goes on the next open.
            if let Err(e) = self.store.remove_layer(old_id) {
                tracing::warn!(
                    "{}: discarded layer {old_id} not removed yet: {e}",
                    self.lun_path.display()
                );
            }
            let mut st = write(&self.state);
            self.gc(&mut st)?;
        }
        Ok(())
    }

    /// Continue in a new empty live delta on top of the current one, which
    /// becomes snapshot `snapshot` (name, description) when given. With
    /// `checksums`, the volume keeps data checksums from now on. The
    /// caller holds the maintenance lock, `io` exclusively and the state
    /// lock, and has flushed.
    fn push_top(
        &self,
        st: &mut State,
        snapshot: Option<(&str, &str)>,
        checksums: bool,
    ) -> Result<()> {
        let first = st.plain;
        let created = now();
        let old_top = st.top;
        let old_id = st.layer(old_top).id();
        let id = Uuid::new_v4();
        let mut m = st.manifest.clone();
        m.layers.push(LayerRec {
            id,
            parent: self.parent_ref(old_id),
            created,
        });
        m.top = id;
        if let Some((name, description)) = snapshot {
            m.snapshots.push(SnapRec {
                name: name.into(),
                layer: old_id,
                created,
                description: description.into(),
            });
        }
        m.checksums |= checksums;
        m.flatten = None;
        let made = Delta::create(
            &*self.store,
            id,
            old_id,
            self.lun,
            self.geo,
            created,
            m.checksums,
        )
        .and_then(|d| self.commit(st, m).map(|()| d));
        let d = match made {
            // The first layer was made before its store was published:
            // reopen it where it lives now.
            Ok(d) if first => {
                drop(d);
                let obj = self.store.open_layer(id, true)?;
                Delta::open(obj, id, self.lun, self.geo)?.0
            }
            Ok(d) => d,
            Err(e) => {
                if first {
                    let _ = self.store.recover(self.lun);
                } else {
                    let _ = self.store.remove_layer(id);
                }
                return Err(e);
            }
        };
        st.plain = false;
        let slot = st.add(Layer::Delta(Box::new(d)), Some(old_top), true);
        st.top = slot;
        st.chain.insert(0, slot);
        if let (Some(old), Some((name, description))) = (st.layer(old_top).delta(), snapshot) {
            if let Err(e) = old.set_frozen(name, description) {
                tracing::warn!(
                    "snapshot {name}: frozen flag not recorded in the layer header: {e}"
                );
            }
        }
        Ok(())
    }

    /// Keep a checksum of every data cluster written from now on, checked
    /// on every read (see [`super::layer`]): a plain volume becomes layered
    /// (its LUN file the base, every write in a checksummed live delta).
    /// Meant for a new LUN, before anything is written: clusters already in
    /// the base stay unchecked. Idempotent.
    pub fn enable_checksums(&self) -> Result<()> {
        self.writable()?;
        if self.native().is_some() {
            // The checksums live in the file store's deltas; a store with
            // its own snapshots (RBD) keeps no deltas.
            return Err(Error::Invalid(format!(
                "{}: data checksums are kept by file-store layers; this store keeps none (Ceph checksums an RBD image's data itself)",
                self.lun_path.display()
            )));
        }
        let _m = self.maintenance()?;
        let _io = self.io.write_blocking();
        self.flush()?;
        let mut st = write(&self.state);
        if !st.plain
            && st.manifest.checksums
            && st.layer(st.top).delta().is_some_and(|d| d.checksums())
        {
            return Ok(());
        }
        if st.plain {
            self.layers_have_a_home("data checksums")?;
        }
        self.push_top(&mut st, None, true)
    }

    /// A block device reached by its own name has no directory to keep
    /// layers in (one next to /dev/sdX would live in devtmpfs and vanish at
    /// reboot); one linked into a pool directory (`POOL/NAME.lun` → the
    /// device) keeps them there, beside the link.
    fn layers_have_a_home(&self, what: &str) -> Result<()> {
        if self.home().is_block_device() && self.lun_path.starts_with("/dev") {
            return Err(Error::Invalid(format!(
                "{} is a block device reached under /dev: {what} need a directory for its layers; \
                 link it into a pool (lunctl create NAME --pool DIR --device {}) and use it from there",
                self.lun_path.display(),
                self.lun_path.display()
            )));
        }
        Ok(())
    }

    /// Whether new writes are checksummed (the live layer keeps checksums).
    pub fn checksums(&self) -> bool {
        let st = read(&self.state);
        !st.plain && st.layer(st.top).delta().is_some_and(|d| d.checksums())
    }

    /// Snapshots with their parent links (a tree), oldest first.
    pub fn snapshots(&self) -> Vec<SnapshotInfo> {
        if let Some(t) = self.native() {
            return self.native_snapshots(t);
        }
        let st = read(&self.state);
        if st.plain {
            return vec![];
        }
        st.manifest
            .snapshots
            .iter()
            .filter_map(|s| self.info(&st, &s.name))
            .collect()
    }

    fn info(&self, st: &State, name: &str) -> Option<SnapshotInfo> {
        let names = st.names();
        let named_above = |slot: u16| -> Option<String> {
            let mut at = st.node(slot).parent;
            while let Some(s) = at {
                if let Some(n) = names.get(&st.layer(s).id()) {
                    return Some(n.to_string());
                }
                at = st.node(s).parent;
            }
            None
        };
        let rec = st.manifest.snapshot(name)?;
        let slot = *st.by_id.get(&rec.layer)?;
        Some(SnapshotInfo {
            name: rec.name.clone(),
            description: rec.description.clone(),
            created: rec.created,
            parent: named_above(slot),
            layer: rec.layer,
            current: named_above(st.top).as_deref() == Some(name),
        })
    }

    /// Discard the live layer and continue from snapshot `name` in a new
    /// empty delta. O(1) in the volume size: no data is read or copied (the
    /// index is rebuilt in memory from the target chain's maps). The three
    /// phases of a live revert in one call: [`Volume::prepare_revert`],
    /// [`Volume::switch_revert`], [`Volume::finish_switch`].
    pub fn revert(&self, name: &str) -> Result<()> {
        self.prepare_revert(name)?;
        self.switch_revert(name)?;
        self.finish_switch()
    }

    /// Phase one of a live revert, before the guests are paused: make the
    /// next live delta ahead on snapshot `name`'s layer (its file created,
    /// flagged spare and synced) and the live index it will need. Nothing
    /// is flushed: the revert discards what the live layer holds. Returns
    /// the layer that will be live after the revert (`None` on a store
    /// with its own snapshots, whose revert is done whole at the switch).
    pub fn prepare_revert(&self, name: &str) -> Result<Option<Uuid>> {
        self.writable()?;
        if let Some(t) = self.native() {
            // The store's revert makes the layer it names here live.
            return t.prepare_revert(name).map(Some);
        }
        let _m = self.maintenance()?;
        let st = read(&self.state);
        let target_id = self.snap(&st, name)?.layer;
        let target = st.by_id[&target_id];
        let mut spare = lock(&self.spare);
        let reuse = spare
            .as_ref()
            .is_some_and(|s| s.parent == target_id && s.checksums == st.manifest.checksums);
        if !reuse {
            self.drop_spare(&mut spare);
            *spare = Some(self.make_spare(&st, target_id)?);
        }
        let sp = spare.as_mut().expect("made above");
        let chain = st.chain_of(target);
        if !sp
            .index
            .as_ref()
            .is_some_and(|p| p.generation == st.generation && p.chain == chain)
        {
            let table = st.build_index(&chain, self.geo.clusters);
            sp.index = Some(Prebuilt {
                generation: st.generation,
                chain,
                table,
            });
        }
        Ok(Some(sp.id))
    }

    /// Phase two, while the guests are paused: the live layer is
    /// discarded and the spare delta on snapshot `name`'s layer becomes
    /// the live layer, in memory; no byte is written. Until
    /// [`Volume::finish_switch`] has committed it, a crash finds the LUN as
    /// it was before the revert (and removes the spare with every write
    /// since, none of which was flushed: every flush, FUA write and tree
    /// operation finishes the switch first). Without a matching spare (no
    /// [`Volume::prepare_revert`]) the spare is made here, in the pause;
    /// on a store with its own snapshots (RBD) the revert is made whole and
    /// durable here.
    pub fn switch_revert(&self, name: &str) -> Result<()> {
        self.writable()?;
        if let Some(t) = self.native() {
            return self.native_revert(t, name);
        }
        let _m = self.maintenance()?;
        let _io = self.io.write_blocking();
        let mut st = write(&self.state);
        let target_id = self.snap(&st, name)?.layer;
        let target = st.by_id[&target_id];
        let mut spare = lock(&self.spare);
        let ready = spare
            .as_ref()
            .is_some_and(|s| s.parent == target_id && s.checksums == st.manifest.checksums);
        let sp = if ready {
            spare.take().expect("checked above")
        } else {
            self.drop_spare(&mut spare);
            self.make_spare(&st, target_id)?
        };
        drop(spare);
        let generation = st.generation.checked_add(1).ok_or_else(|| {
            corrupt(
                self.store.location(),
                format!("manifest generation {} cannot advance", st.generation),
            )
        })?;
        let old_top = st.top;
        let old_id = st.layer(old_top).id();
        let mut m = st.manifest.clone();
        m.layers.retain(|l| l.id != old_id);
        m.retired.push(old_id);
        m.layers.push(LayerRec {
            id: sp.id,
            parent: self.parent_ref(target_id),
            created: sp.created,
        });
        m.top = sp.id;
        if m.flatten.as_ref().is_some_and(|f| f.layer == old_id) {
            m.flatten = None;
        }
        let chain = st.chain_of(target);
        let idx = match sp.index {
            Some(p) if p.generation == st.generation && p.chain == chain => p.table,
            _ => st.build_index(&chain, self.geo.clusters),
        };
        let old = st.remove(old_top).expect("the live slot").layer;
        st.manifest = m.clone();
        st.generation = generation;
        let slot = st.add(Layer::Delta(Box::new(sp.delta)), Some(target), true);
        st.top = slot;
        st.chain = st.chain_of(slot);
        // The spare holds nothing: the chain below it is the whole index.
        *st.index.get_mut().unwrap_or_else(|e| e.into_inner()) = idx;
        self.dirty.mark_all();
        *lock(&self.pending) = Some(PendingSwitch {
            new: st.node(slot).layer.clone(),
            manifest: m,
            generation,
            kind: Switch::Revert { old },
        });
        self.switch_pending.store(true, Ordering::Release);
        Ok(())
    }

    /// Remove snapshot `name`. Its layer is kept while other snapshots,
    /// branches or clones need it; an unnamed layer with no children is
    /// removed, and one with a single child is merged into that child
    /// (clusters the child lacks are copied up), so no view loses a byte.
    pub fn delete_snapshot(&self, name: &str) -> Result<()> {
        self.delete_snapshot_with(name, &mut crate::progress::silent())
    }

    /// [`Volume::delete_snapshot`], reporting the bytes of the clusters it
    /// merges (phase `merge`) to `progress`.
    pub fn delete_snapshot_with(&self, name: &str, progress: &mut dyn Progress) -> Result<()> {
        self.writable()?;
        if let Some(t) = self.native() {
            return self.native_delete_with(t, name, progress);
        }
        let _m = self.maintenance()?;
        let mut st = write(&self.state);
        let layer = self.snap(&st, name)?.layer;
        let mut m = st.manifest.clone();
        m.snapshots.retain(|s| s.name != name);
        self.commit(&mut st, m)?;
        // A layer kept for other views stops naming the deleted snapshot,
        // so a manifest rebuilt from the headers does not bring it back.
        if let Some(d) = st.by_id.get(&layer).and_then(|&s| st.layer(s).delta()) {
            if let Err(e) = d.set_frozen("", "") {
                tracing::warn!("delete snapshot {name}: layer header still names it: {e}");
            }
        }
        self.gc(&mut st)?;
        drop(st);
        self.merge_all(progress)
    }

    /// Remove unnamed, unpinned layers that nothing needs (and forget
    /// clones that no longer reach into ours).
    fn gc(&self, st: &mut State) -> Result<()> {
        while self.gc_step(st, false)?.is_some() {}
        Ok(())
    }

    /// One step of [`Volume::gc`]: remove one removable layer (`Some(None)`),
    /// or with `merge` name one unnamed layer with a single child to fold
    /// into it (`Some(Some((x, child)))`); `None` when nothing is left to do.
    fn gc_step(&self, st: &mut State, merge: bool) -> Result<Option<Option<(Uuid, Uuid)>>> {
        let me = abs(&self.dir);
        let m = &st.manifest;
        let live: Vec<Dependent> = m
            .dependents
            .iter()
            .filter(|d| dependent_alive(&self.pool, self.lun, &me, d))
            .cloned()
            .collect();
        let mut pinned = HashSet::new();
        for d in &live {
            let mut at = Some(d.layer);
            while let Some(id) = at {
                pinned.insert(id);
                at = match m.layer(id).map(|l| &l.parent) {
                    Some(Parent::Layer { id }) => Some(*id),
                    _ => None,
                };
            }
        }
        let named: HashSet<Uuid> = m.snapshots.iter().map(|s| s.layer).collect();
        let mut action = None;
        for l in &m.layers {
            if l.id == m.top || named.contains(&l.id) || pinned.contains(&l.id) {
                continue;
            }
            let children: Vec<Uuid> = m
                .layers
                .iter()
                .filter(|c| c.parent == Parent::Layer { id: l.id })
                .map(|c| c.id)
                .collect();
            match children.len() {
                0 => {
                    action = Some((l.id, None));
                    break;
                }
                1 if merge => {
                    action = Some((l.id, Some(children[0])));
                    break;
                }
                _ => {}
            }
        }
        match action {
            None => {
                if live.len() != m.dependents.len() {
                    let mut m = m.clone();
                    m.dependents = live;
                    self.commit(st, m)?;
                }
                Ok(None)
            }
            Some((x, None)) => {
                let mut m = st.manifest.clone();
                m.layers.retain(|l| l.id != x);
                m.retired.push(x);
                self.commit(st, m)?;
                if st.remove(st.by_id[&x]).is_some() {
                    let _ = self.store.remove_layer(x);
                }
                Ok(Some(None))
            }
            Some((x, Some(c))) => Ok(Some(Some((x, c)))),
        }
    }

    /// Fold every unnamed single-child layer into its child, in the
    /// background of guest I/O: the copy runs in bounded steps under the
    /// shared state lock and per-cluster locks (guests wait at most for the
    /// cluster being copied), and only the final re-parenting takes the
    /// state lock exclusively (one manifest commit). The caller holds the
    /// maintenance lock and not the state lock. Reports `merge` progress.
    fn merge_all(&self, progress: &mut dyn Progress) -> Result<()> {
        let mut merged = 0;
        loop {
            let next = {
                let mut st = write(&self.state);
                loop {
                    match self.gc_step(&mut st, true)? {
                        Some(None) => continue,
                        Some(Some(pair)) => break Some(pair),
                        None => break None,
                    }
                }
            };
            let Some((x, c)) = next else {
                return Ok(());
            };
            merged = self.merge_copy(x, c, merged, progress)?;
            let mut st = write(&self.state);
            self.merge_finish(&mut st, x, c)?;
        }
    }

    /// Copy the clusters of `x` that its only child `c` lacks into `c` and
    /// commit `c`, in batches of [`MERGE_BATCH`] clusters, each under the
    /// shared state lock and each cluster under its shard lock, so guest
    /// reads and writes go on between (and beside) them. `x` is frozen: its
    /// map does not change meanwhile. Returns `base` plus the bytes of
    /// `x`'s clusters.
    fn merge_copy(&self, x: Uuid, c: Uuid, base: u64, progress: &mut dyn Progress) -> Result<u64> {
        let cluster = self.geo.cluster_size;
        let (entries, in_chain) = {
            let st = read(&self.state);
            let xs = st.by_id[&x];
            let cs = st.by_id[&c];
            let entries: Vec<(u64, u64)> = read(&st.delta(xs).map).iter().collect();
            (entries, st.chain.contains(&cs))
        };
        let end = base + entries.len() as u64 * cluster;
        progress.update("merge", base, end);
        let mut buf = vec![0u8; self.geo.cluster_size as usize];
        for (bi, batch) in entries.chunks(MERGE_BATCH).enumerate() {
            let st = read(&self.state);
            let (xs, cs) = (st.by_id[&x], st.by_id[&c]);
            let (xd, cd) = (st.delta(xs), st.delta(cs));
            for &(vc, v) in batch {
                let _g = self.shard(vc).write_blocking();
                if cd.get(vc) != 0 {
                    continue;
                }
                let new = if journal::kind(v) == KIND_DATA {
                    let n = self.cluster_len(vc);
                    xd.read_checked(vc, journal::phys(v), n, 0, &mut buf[..n])?;
                    let p = cd.alloc();
                    if let Err(e) = cd.write_data(p, 0, &buf[..n]) {
                        cd.unalloc(p);
                        return Err(e);
                    }
                    journal::data(p)
                } else {
                    journal::ZERO
                };
                cd.set_entry(vc, new);
                if in_chain {
                    let mut idx = write(&st.index);
                    let e = idx.get(vc);
                    if e != 0 && slot_of(e) == xs {
                        idx.set(vc, pack(cs, new));
                    }
                }
            }
            drop(st);
            progress.update(
                "merge",
                base + ((bi + 1) * MERGE_BATCH).min(entries.len()) as u64 * cluster,
                end,
            );
        }
        let st = read(&self.state);
        self.commit_layer(st.delta(st.by_id[&c]))?;
        Ok(end)
    }

    /// The short, exclusive end of a merge: re-parent `c` to `x`'s parent
    /// and drop `x` (one manifest commit).
    fn merge_finish(&self, st: &mut State, x: Uuid, c: Uuid) -> Result<()> {
        let (xs, cs) = (st.by_id[&x], st.by_id[&c]);
        let mut m = st.manifest.clone();
        let xparent = m.layer(x).expect("listed").parent.clone();
        m.layers.retain(|l| l.id != x);
        m.retired.push(x);
        for l in &mut m.layers {
            if l.id == c {
                l.parent = xparent.clone();
            }
        }
        st.delta(cs).set_parent(header_parent(&xparent, self.lun))?;
        self.commit(st, m)?;
        let xp = st.node(xs).parent;
        st.nodes[cs as usize].as_mut().expect("live").parent = xp;
        if st.remove(xs).is_some() {
            let _ = self.store.remove_layer(x);
        }
        st.chain = st.chain_of(st.top);
        Ok(())
    }

    /// Make a new volume from snapshot `name`: `target` is a LUN file the
    /// caller has created (same size; its own UUID and identity); its chain
    /// becomes one empty delta in the target's layers directory whose
    /// parent is the snapshot's layer here. O(1). Our manifest records the
    /// clone as a dependent so the layers it needs are never merged away.
    pub fn clone_to(&self, name: &str, target: VolumeConfig) -> Result<Volume> {
        self.writable()?;
        if self.native().is_some() {
            return Err(Error::Invalid(format!(
                "{}: clones of a volume with native snapshots are made with clone_native",
                self.lun_path.display()
            )));
        }
        let _m = self.maintenance()?;
        let mut st = write(&self.state);
        let layer = self.snap(&st, name)?.layer;
        // A snapshot taken before the volume grew is cloned at its own
        // size: every layer of its chain must fit the clone.
        let chain_size = st
            .chain_of(st.by_id[&layer])
            .iter()
            .filter_map(|&s| st.layer(s).delta().map(|d| d.geo.size))
            .max()
            .unwrap_or(0);
        if target.size > self.geo.size || target.size < chain_size {
            return Err(Error::Invalid(format!(
                "clone target {} is {} bytes; snapshot {name} needs {chain_size} to {} bytes",
                target.lun_path.display(),
                target.size,
                self.geo.size
            )));
        }
        // Clones and parents find each other by name and UUID in one pool.
        let same_pool = |a: &Path, b: &Path| abs(&parent_dir(a)) == abs(&parent_dir(b));
        if !same_pool(&target.lun_path, &self.lun_path) {
            return Err(Error::Invalid(format!(
                "clone target {} is not in the pool of {} ({}): a clone lives beside its parent",
                target.lun_path.display(),
                self.lun_path.display(),
                self.pool.display()
            )));
        }
        let tstore = crate::store::hook::wrapped(Arc::new(FileStore::new(
            &target.lun_path,
            target.file.clone(),
            target.engine.clone(),
            true,
        )));
        if tstore.exists() || !tstore.list_layers()?.is_empty() {
            return Err(Error::Invalid(format!(
                "clone target {} already has layers",
                tstore.location().display()
            )));
        }
        let mut m = st.manifest.clone();
        m.dependents.push(Dependent {
            dir: tstore.reference(),
            lun: target.lun_uuid,
            layer,
        });
        self.commit(&mut st, m)?;
        let created = now();
        let id = Uuid::new_v4();
        let geo = Geometry::new(self.geo.cluster_size, target.size)
            .ok_or_else(|| Error::Invalid(format!("clone size {} is invalid", target.size)))?;
        let checksums = st.manifest.checksums;
        Delta::create(
            &*tstore,
            id,
            layer,
            target.lun_uuid,
            geo,
            created,
            checksums,
        )?;
        let tm = Manifest {
            lun: target.lun_uuid,
            size: geo.size,
            cluster_size: geo.cluster_size as u32,
            lun_path: pool_name(&target.lun_path),
            layers: vec![LayerRec {
                id,
                parent: Parent::External {
                    dir: self.store.reference(),
                    id: layer,
                    lun: Some(self.lun),
                },
                created,
            }],
            top: id,
            snapshots: vec![],
            dependents: vec![],
            flatten: None,
            retired: vec![],
            checksums,
            layouts: Default::default(),
            live: None,
            images: Default::default(),
            forks: Default::default(),
        };
        // The target store's first commit publishes its layers.
        tstore.commit_manifest(&tm, 1)?;
        drop(st);
        let engine = target.engine.clone().or_else(|| self.engine.clone());
        Volume::open(VolumeConfig {
            options: VolumeOptions {
                cluster_size: geo.cluster_size as u32,
                read_only: false,
            },
            engine,
            ..target
        })
    }

    /// Copy every cluster the live layer reads through its ancestors into
    /// the live layer itself, then cut it loose (parent: none), so the
    /// volume depends on no shared layer. Reads and writes continue
    /// meanwhile; snapshot and revert wait. Progress is persisted in the
    /// manifest, so after a crash a new call resumes where it stopped.
    /// `progress(done, total)` counts clusters.
    pub fn flatten(&self, mut progress: impl FnMut(u64, u64)) -> Result<()> {
        self.writable()?;
        if let Some(t) = self.native() {
            return self.native_flatten(t, &mut progress);
        }
        let _m = self.maintenance()?;
        let total = self.geo.clusters;
        let (top_id, start) = {
            let mut st = write(&self.state);
            if st.plain || st.chain.len() == 1 {
                progress(total, total);
                return Ok(());
            }
            let top_id = st.layer(st.top).id();
            let start = match &st.manifest.flatten {
                Some(f) if f.layer == top_id => f.next,
                _ => {
                    let mut m = st.manifest.clone();
                    m.flatten = Some(FlattenRec {
                        layer: top_id,
                        next: 0,
                    });
                    self.commit(&mut st, m)?;
                    0
                }
            };
            (top_id, start)
        };
        let persist_every = (total / 64).max(4096);
        let mut last_persist = start;
        let mut buf = vec![0u8; self.geo.cluster_size as usize];
        let mut vc = start;
        progress(vc, total);
        while vc < total {
            let end = (vc + 256).min(total);
            {
                let st = read(&self.state);
                for c in vc..end {
                    self.flatten_cluster(&st, c, &mut buf)?;
                }
            }
            vc = end;
            if vc - last_persist >= persist_every && vc < total {
                let mut st = write(&self.state);
                self.commit_layer(st.delta(st.top))?;
                let mut m = st.manifest.clone();
                m.flatten = Some(FlattenRec {
                    layer: top_id,
                    next: vc,
                });
                self.commit(&mut st, m)?;
                last_persist = vc;
            }
            progress(vc, total);
        }
        let mut st = write(&self.state);
        self.commit_layer(st.delta(st.top))?;
        st.delta(st.top).set_parent(Uuid::nil())?;
        let mut m = st.manifest.clone();
        for l in &mut m.layers {
            if l.id == top_id {
                l.parent = Parent::None;
            }
        }
        m.flatten = None;
        self.commit(&mut st, m)?;
        let top = st.top;
        st.nodes[top as usize].as_mut().expect("live").parent = None;
        st.chain = vec![top];
        let idx = st.build_index(&st.chain, self.geo.clusters);
        *st.index.get_mut().unwrap_or_else(|e| e.into_inner()) = idx;
        self.gc(&mut st)?;
        drop(st);
        self.merge_all(&mut crate::progress::silent())
    }

    fn flatten_cluster(&self, st: &State, vc: u64, buf: &mut [u8]) -> Result<()> {
        let top = st.delta(st.top);
        let _g = self.shard(vc).write_blocking();
        if top.get(vc) != 0 {
            return Ok(());
        }
        let e = read(&st.index).get(vc);
        let n = self.cluster_len(vc);
        let buf = &mut buf[..n];
        if e == 0 {
            let Some(root) = st.root_raw(&st.chain) else {
                return Ok(());
            };
            root.obj
                .read_at(buf, vc * self.geo.cluster_size)
                .ctx(root.obj.name(), "read base")?;
            if buf.iter().all(|&b| b == 0) {
                return Ok(());
            }
        } else if journal::kind(val_of(e)) == KIND_ZERO {
            return Ok(());
        } else {
            st.delta(slot_of(e))
                .read_checked(vc, journal::phys(val_of(e)), n, 0, buf)?;
        }
        let p = top.alloc();
        if let Err(err) = top.write_data(p, 0, buf) {
            top.unalloc(p);
            return Err(err);
        }
        top.set_entry(vc, journal::data(p));
        write(&st.index).set(vc, pack(st.top, journal::data(p)));
        Ok(())
    }

    /// Extents that differ between snapshot `from` and snapshot `to` (the
    /// live volume when `None`), with what `to` holds there. Conservative:
    /// a reported extent may hold equal bytes (e.g. copied by a flatten).
    pub fn diff(&self, from: &str, to: Option<&str>) -> Result<Vec<Change>> {
        if let Some(t) = self.native() {
            return self.native_diff(t, from, to);
        }
        let st = read(&self.state);
        let a = st.chain_of(st.by_id[&self.snap(&st, from)?.layer]);
        let b = match to {
            Some(n) => st.chain_of(st.by_id[&self.snap(&st, n)?.layer]),
            None => st.chain.clone(),
        };
        let sa: HashSet<u16> = a.iter().copied().collect();
        let sb: HashSet<u16> = b.iter().copied().collect();
        let sym: Vec<u16> = sa.symmetric_difference(&sb).copied().collect();
        let everything = sym.iter().any(|&s| st.layer(s).delta().is_none());
        let clusters: Box<dyn Iterator<Item = u64>> = if everything {
            Box::new(0..self.geo.clusters)
        } else {
            let mut set = BTreeSet::new();
            for &s in &sym {
                set.extend(read(&st.delta(s).map).iter().map(|(vc, _)| vc));
            }
            Box::new(set.into_iter())
        };
        let cs = self.geo.cluster_size;
        let mut out: Vec<Change> = Vec::new();
        for vc in clusters {
            if self.cluster_protected(vc) {
                continue;
            }
            let start = vc * cs;
            let end = start + self.cluster_len(vc) as u64;
            let (ra, rb) = (self.resolve(&st, &a, vc), self.resolve(&st, &b, vc));
            if ra == rb {
                continue;
            }
            let kind = if rb == Res::Zero {
                ChangeKind::Zero
            } else {
                ChangeKind::Data
            };
            match out.last_mut() {
                Some(l) if l.offset + l.length == start && l.kind == kind => {
                    l.length += end - start
                }
                _ => out.push(Change {
                    offset: start,
                    length: end - start,
                    kind,
                }),
            }
        }
        Ok(out)
    }

    /// The bytes of `[offset, offset + len)` that differ between snapshot
    /// `from` and the live volume: whole clusters (clipped to the range)
    /// that were written, trimmed or zeroed since the snapshot, ascending
    /// and merged. What [`Volume::diff`] reports for those clusters, at a
    /// cost that follows the range, not the volume: a cluster is resolved
    /// in both chains only if a layer the two chains do not share holds
    /// it, so a block-status query over a few MiB of a large disk looks at
    /// those few MiB only. Live writes show up as soon as they returned.
    pub fn changed_since(&self, from: &str, offset: u64, len: u64) -> Result<Vec<Range<u64>>> {
        self.check(offset, len)?;
        let end = offset + len;
        let mut out: Vec<Range<u64>> = Vec::new();
        let mut push = |s: u64, e: u64| match out.last_mut() {
            Some(l) if l.end == s => l.end = e,
            _ => out.push(s..e),
        };
        if let Some(t) = self.native() {
            // A native tree diffs in one call (RBD: rbd_diff_iterate2 over
            // its object map); clip it to the range.
            for c in self.native_diff(t, from, None)? {
                let (s, e) = (c.offset.max(offset), (c.offset + c.length).min(end));
                if s < e {
                    push(s, e);
                }
            }
            return Ok(out);
        }
        let st = read(&self.state);
        let a = st.chain_of(st.by_id[&self.snap(&st, from)?.layer]);
        if len == 0 {
            return Ok(out);
        }
        let b = &st.chain;
        let sa: HashSet<u16> = a.iter().copied().collect();
        let sb: HashSet<u16> = b.iter().copied().collect();
        let sym: Vec<u16> = sa.symmetric_difference(&sb).copied().collect();
        if sym.is_empty() {
            return Ok(out);
        }
        // A raw base only one chain has (a clone's own base) may differ
        // anywhere: resolve every cluster of the range then.
        let everything = sym.iter().any(|&s| st.layer(s).delta().is_none());
        let cs = self.geo.cluster_size;
        for vc in offset / cs..=(end - 1) / cs {
            if self.cluster_protected(vc) {
                continue;
            }
            let start = vc * cs;
            let c_end = start + self.cluster_len(vc) as u64;
            if !everything && !sym.iter().any(|&s| st.delta(s).get(vc) != 0) {
                continue;
            }
            if self.resolve(&st, &a, vc) == self.resolve(&st, b, vc) {
                continue;
            }
            push(start.max(offset), c_end.min(end));
        }
        Ok(out)
    }

    /// A digest of what snapshot `snapshot` (the live volume when `None`)
    /// holds in `ranges` (ascending, inside the volume): what a diff file
    /// records as its base, so that it can be applied to any volume whose
    /// bytes there are the same, whatever its LUN. Canonical: for every
    /// cluster-aligned piece of the ranges that is not all zeros, its
    /// offset, length and blake3 (keyed for this use), so a hole and
    /// written zeros hash alike. Clusters the view maps to nothing are
    /// skipped without a read; the others are read (O(allocated bytes)).
    pub fn content_digest(
        &self,
        snapshot: Option<&str>,
        ranges: &[Range<u64>],
    ) -> Result<[u8; 32]> {
        let mut h = blake3::Hasher::new_derive_key("lungate diff base digest v1");
        let cs = self.geo.cluster_size;
        let mut buf = vec![0u8; cs as usize];
        let mut last = 0;
        for r in ranges {
            if r.start < last || r.start > r.end {
                return Err(Error::Invalid(format!(
                    "digest ranges must ascend: {r:?} after {last}"
                )));
            }
            self.check(r.start, r.end - r.start)?;
            last = r.end;
            let mut piece = |at: u64, b: &[u8]| {
                if b.iter().any(|&x| x != 0) {
                    h.update(&at.to_le_bytes());
                    h.update(&(b.len() as u64).to_le_bytes());
                    h.update(blake3::hash(b).as_bytes());
                }
            };
            let pieces = (r.start / cs..r.end.div_ceil(cs))
                .map(|vc| (vc * cs).max(r.start)..((vc + 1) * cs).min(r.end));
            let layered = self.native().is_none() && !read(&self.state).plain;
            if !layered {
                for p in pieces {
                    let b = &mut buf[..(p.end - p.start) as usize];
                    match snapshot {
                        Some(n) => self.read_snapshot(n, p.start, b)?,
                        None => self.read(p.start, b)?,
                    }
                    piece(p.start, b);
                }
                continue;
            }
            // One view of the whole range: the chain resolved once, under
            // one hold of the state lock; clusters no layer holds (zeros)
            // are not read.
            let st = read(&self.state);
            let chain = match snapshot {
                Some(n) => st.chain_of(st.by_id[&self.snap(&st, n)?.layer]),
                None => st.chain.clone(),
            };
            for p in pieces {
                if self.resolve(&st, &chain, p.start / cs) == Res::Zero {
                    continue;
                }
                let b = &mut buf[..(p.end - p.start) as usize];
                self.read_view(&st, &chain, snapshot.is_none(), p.start, b)?;
                piece(p.start, b);
            }
        }
        Ok(*h.finalize().as_bytes())
    }

    /// Space used by every layer this volume knows.
    pub fn usage(&self) -> Vec<LayerUsage> {
        if let Some(t) = self.native() {
            return self.native_usage(t);
        }
        let st = read(&self.state);
        let names = st.names();
        let in_chain: HashSet<u16> = st.chain.iter().copied().collect();
        st.nodes
            .iter()
            .enumerate()
            .filter_map(|(s, n)| n.as_ref().map(|n| (s as u16, n)))
            .map(|(s, n)| LayerUsage {
                layer: n.layer.id(),
                path: n.layer.path().to_path_buf(),
                snapshot: names.get(&n.layer.id()).map(|s| s.to_string()),
                live: s == st.top,
                in_chain: in_chain.contains(&s),
                external: !n.own,
                allocated_bytes: match &*n.layer {
                    Layer::Raw(_) => self.geo.size,
                    Layer::Delta(d) => d.data_clusters() * self.geo.cluster_size,
                },
                disk_bytes: n.layer.disk_bytes(),
            })
            .collect()
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        if !self.crashed.load(Ordering::SeqCst) {
            if let Err(e) = self.flush() {
                tracing::error!("{}: flush on close failed: {e}", self.lun_path.display());
            }
            // A spare no snapshot used: not left for the next open.
            let mut spare = lock(&self.spare);
            self.drop_spare(&mut spare);
        }
    }
}

/// Load a layer of another volume of `pool` (and its ancestors)
/// read-only: the volume whose layers directory `dir_ref` names, of LUN
/// `lun` (see [`resolve_peer`]).
#[allow(clippy::too_many_arguments)]
fn resolve_external(
    st: &mut State,
    pool: &Path,
    dir_ref: &Path,
    lun: Option<Uuid>,
    id: Uuid,
    geo: Geometry,
    engine: Option<&IoEngine>,
    warnings: &mut Vec<String>,
    depth: usize,
) -> Result<u16> {
    if let Some(&s) = st.by_id.get(&id) {
        return Ok(s);
    }
    if depth > 4096 {
        return Err(corrupt(dir_ref, "external layer chain too deep (a cycle?)"));
    }
    let dir = resolve_peer(pool, dir_ref, lun)?;
    let dir = dir.as_path();
    let l = manifest::load(dir)?.ok_or_else(|| {
        corrupt(
            dir,
            format!("layer {id} is needed but the directory has no manifest"),
        )
    })?;
    let m = l.manifest;
    // Sizes may differ (either side may have grown since the clone was
    // made): each layer is checked against the clone's size as it opens.
    if m.cluster_size as u64 != geo.cluster_size {
        return Err(corrupt(
            dir,
            format!(
                "cluster size {} differs from the clone's {}",
                m.cluster_size, geo.cluster_size
            ),
        ));
    }
    if id == m.lun {
        let base = peer_base(dir, &m.lun_path).ok_or_else(|| {
            corrupt(
                dir,
                format!(
                    "the LUN file {} these layers belong to is not in the pool",
                    m.lun_path.display()
                ),
            )
        })?;
        let obj = FileObject::open(&base, false, engine.cloned())
            .ctx(&base, "open base LUN of a clone")?;
        let slot = st.add(
            Layer::Raw(Raw {
                id,
                obj: Arc::new(obj),
            }),
            None,
            false,
        );
        return Ok(slot);
    }
    let rec = m
        .layer(id)
        .ok_or_else(|| corrupt(dir, format!("layer {id} is needed but not listed")))?
        .clone();
    let path = delta_path(dir, id);
    let obj = FileObject::open(&path, false, engine.cloned()).ctx(&path, "open layer")?;
    let (d, w) = Delta::open(Arc::new(obj), id, m.lun, geo)?;
    warnings.extend(w);
    let slot = st.add(Layer::Delta(Box::new(d)), None, false);
    let (next_dir, next_lun, next_id) = match rec.parent {
        Parent::Base => (dir.to_path_buf(), Some(m.lun), Some(m.lun)),
        Parent::None => (dir.to_path_buf(), None, None),
        Parent::Layer { id } => (dir.to_path_buf(), Some(m.lun), Some(id)),
        Parent::External { dir: d2, id, lun } => (d2, lun, Some(id)),
    };
    let parent = match next_id {
        None => None,
        Some(pid) => Some(resolve_external(
            st,
            pool,
            &next_dir,
            next_lun,
            pid,
            geo,
            engine,
            warnings,
            depth + 1,
        )?),
    };
    st.nodes[slot as usize].as_mut().expect("just added").parent = parent;
    Ok(slot)
}

/// Whether the clone recorded in `d` still reaches into our layers (LUN
/// `me`, layers directory `me_dir`). Unreadable manifests count as alive:
/// a pin is only dropped for certain.
fn dependent_alive(pool: &Path, me: Uuid, me_dir: &Path, d: &Dependent) -> bool {
    let Ok(dir) = resolve_peer(pool, &d.dir, Some(d.lun)) else {
        // Gone from the pool for certain only if the directory is absent.
        let dir = if d.dir.is_absolute() {
            d.dir.clone()
        } else {
            pool.join(&d.dir)
        };
        return dir.symlink_metadata().is_ok();
    };
    match manifest::load(&dir) {
        Ok(None) => false,
        Ok(Some(l)) => l.manifest.layers.iter().any(|x| match &x.parent {
            Parent::External { dir, id, lun } if *id == d.layer => match lun {
                Some(u) => *u == me,
                None => abs(dir) == me_dir,
            },
            _ => false,
        }),
        Err(_) => true,
    }
}

/// Deal with delta files the manifest does not list. Only two kinds are
/// removed, because only they can be proved to hold nothing anyone needs:
/// layers a committed manifest retired (a crash came between the commit
/// and the removal) and layers that never committed a byte (a crash came
/// between creating a layer and committing it). Any other unlisted layer
/// holds data no manifest accounts for; it is kept and reported.
fn remove_orphans(store: &dyn Store, m: &Manifest, warnings: &mut Vec<String>) -> Result<()> {
    let known: HashSet<Uuid> = m.layers.iter().map(|l| l.id).collect();
    for id in store.list_layers()? {
        if known.contains(&id) {
            continue;
        }
        let obj = store.open_layer(id, false)?;
        let name = obj.name().display().to_string();
        if m.retired.contains(&id) {
            drop(obj);
            store.remove_layer(id)?;
            warnings.push(format!("{name}: removed a layer the manifest had retired"));
        } else if holds_nothing(&*obj, m.lun) {
            drop(obj);
            store.remove_layer(id)?;
            warnings.push(format!("{name}: removed an uncommitted, empty layer"));
        } else if is_spare(&*obj, m.lun) {
            drop(obj);
            store.remove_layer(id)?;
            warnings.push(format!(
                "{name}: removed the spare layer of a snapshot or revert a crash interrupted (no manifest named it; nothing in it was flushed)"
            ));
        } else {
            warnings.push(format!(
                "{name}: kept a layer file the manifest does not list; it may hold data (docs/volumes.md, \"Damaged layers\")"
            ));
        }
    }
    Ok(())
}

/// The parent UUID a delta header records for a manifest parent.
fn header_parent(p: &Parent, lun: Uuid) -> Uuid {
    match p {
        Parent::Base => lun,
        Parent::None => Uuid::nil(),
        Parent::Layer { id } | Parent::External { id, .. } => *id,
    }
}
