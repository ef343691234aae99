//! Exports: one NBD export is one disk region of a LUN.
//!
//! An [`Export`] is a name, its flags and the top of the LUN's stack for
//! that disk: a region view over the LUN's gate and volume, built once when
//! the export is, from the disk's [`lungate_block::region::View`] as the
//! LUN describes it ([`Lun::disk_view`]): a [`Region`] (offset, truncate)
//! or an aligned view (the aligned layout's disk0, whose shadowed first MiB
//! goes through the same gate and volume to the state region's shadow
//! area). The view checks every request range against the export size,
//! with checked arithmetic, before it translates it (see
//! `lungate_block::region`); this module adds only the protocol's
//! block-size rules, and never does I/O itself.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use lun_manager::Lun;
use lungate_block::engine::IoEngine;
use lungate_block::region::RegionError;
use lungate_block::{BlockDevice, Region};
use lungate_config::{AllowRule, GatewayConfig, Peer};

use crate::served::{ServeError, ServedLun};
use crate::switch::SwitchStats;

/// Block size constraints in force for an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    pub minimum: u32,
    pub preferred: u32,
    pub maximum: u32,
}

impl Default for BlockSizes {
    fn default() -> Self {
        BlockSizes {
            minimum: 1,
            preferred: 4096,
            maximum: 32 << 20,
        }
    }
}

/// Why a request was refused by the block-size rules. Mapped to NBD
/// errors by the session (out-of-range requests are refused by the region
/// view, as `lungate_block::device::RangeError`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error("offset {offset} / length {length} not aligned to minimum block size {minimum}")]
    Misaligned {
        offset: u64,
        length: u64,
        minimum: u32,
    },
    #[error("length {length} exceeds maximum block size {maximum}")]
    TooLong { length: u64, maximum: u32 },
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("export {name:?}: {source}")]
    Region { name: String, source: RegionError },
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error("export {name:?}: LUN {path} has no disk {disk}")]
    NoSuchDisk {
        name: String,
        path: PathBuf,
        disk: u32,
    },
    #[error("invalid configuration: {0}")]
    Config(#[from] lungate_config::ConfigError),
}

/// One disk region served over NBD.
pub struct Export {
    pub name: String,
    pub description: Option<String>,
    /// The top of the stack: the region view of this disk.
    pub dev: Arc<dyn BlockDevice>,
    pub read_only: bool,
    pub block: BlockSizes,
    pub disk_id: Option<[u8; 16]>,
    /// Disk index in the LUN.
    pub disk: u32,
    pub allow: Vec<AllowRule>,
    /// LUN file this export lives in (for logs).
    pub lun_path: PathBuf,
    /// The served LUN (gate, volume, ownership); `None` only for views of
    /// bare files in tests.
    pub lun: Option<Arc<ServedLun>>,
    pub stats: ExportStats,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("size", &self.size())
            .field("read_only", &self.read_only)
            .field("lun_path", &self.lun_path)
            .finish()
    }
}

/// Counters for `/v1/stats` and `/v1/exports`.
#[derive(Debug, Default)]
pub struct ExportStats {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub errors: AtomicU64,
    pub in_flight: AtomicU64,
    pub connections: AtomicU64,
}

impl ExportStats {
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
    pub fn sub(c: &AtomicU64, n: u64) {
        c.fetch_sub(n, Ordering::Relaxed);
    }
}

impl Export {
    /// An export of `dev` (the top of its stack, a region view).
    pub fn new(
        name: String,
        dev: Arc<dyn BlockDevice>,
        read_only: bool,
        block: BlockSizes,
        lun_path: PathBuf,
    ) -> Export {
        Export {
            name,
            description: None,
            dev,
            read_only,
            block,
            disk_id: None,
            disk: 0,
            allow: Vec::new(),
            lun_path,
            lun: None,
            stats: ExportStats::default(),
        }
    }

    /// An export of `[base, base + size)` of the file at `path`, served
    /// on `engine` (bare-file views: tests and tools).
    pub fn of_file(
        name: String,
        path: &Path,
        base: u64,
        size: u64,
        read_only: bool,
        block: BlockSizes,
        engine: &IoEngine,
    ) -> std::io::Result<Export> {
        let obj =
            lungate_block::store::file::FileObject::open(path, !read_only, Some(engine.clone()))?;
        let region = Region::new(Arc::new(obj), base, size)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        Ok(Export::new(
            name,
            Arc::new(region),
            read_only,
            block,
            path.to_path_buf(),
        ))
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.dev.size()
    }

    /// The block size rules: alignment to the minimum block size always,
    /// and the maximum for payload-carrying commands. (The range itself is
    /// checked by the region view.)
    pub fn check_block_sizes(
        &self,
        offset: u64,
        length: u64,
        enforce_maximum: bool,
    ) -> Result<(), RangeError> {
        let min = u64::from(self.block.minimum);
        if offset % min != 0 || length % min != 0 {
            return Err(RangeError::Misaligned {
                offset,
                length,
                minimum: self.block.minimum,
            });
        }
        if enforce_maximum && length > u64::from(self.block.maximum) {
            return Err(RangeError::TooLong {
                length,
                maximum: self.block.maximum,
            });
        }
        Ok(())
    }

    /// The snapshots of the export's LUN, oldest first: each is offered
    /// as a `qemu:dirty-bitmap:NAME` metadata context (the disk's changes
    /// since it). None for a bare file.
    pub fn snapshot_names(&self) -> Vec<String> {
        let Some(lun) = &self.lun else {
            return Vec::new();
        };
        let mut snaps = lun.lun.volume().snapshots();
        snaps.sort_by_key(|s| s.created);
        snaps.into_iter().map(|s| s.name).collect()
    }

    /// May `peer` see and use this export?
    pub fn allows(&self, peer: &Peer) -> bool {
        peer.allowed_by(&self.allow)
    }
}

/// The exports of a running gateway; a clone made through the control API
/// adds to it while connections are being served (copy on write: a reader
/// keeps the set it looked at).
#[derive(Debug, Default)]
pub struct Exports {
    current: RwLock<Arc<ExportSet>>,
}

impl Exports {
    pub fn new(set: ExportSet) -> Exports {
        Exports {
            current: RwLock::new(Arc::new(set)),
        }
    }

    pub fn current(&self) -> Arc<ExportSet> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Add exports; names already taken are refused (the existing export is
    /// kept) and returned.
    pub fn add(&self, new: Vec<Export>) -> Vec<String> {
        let mut cur = self.current.write().unwrap_or_else(|e| e.into_inner());
        let mut set = (**cur).clone();
        let mut refused = Vec::new();
        for e in new {
            if set.get(&e.name).is_some() {
                refused.push(e.name.clone());
            } else {
                set.insert(e);
            }
        }
        *cur = Arc::new(set);
        refused
    }

    /// Remove every export of the served LUN `lun` (a LUN that migrated
    /// away: new connections cannot find it; connections already open keep
    /// their export). Returns the names removed.
    pub fn remove_lun(&self, lun: &Arc<ServedLun>) -> Vec<String> {
        let mut cur = self.current.write().unwrap_or_else(|e| e.into_inner());
        let mut removed = Vec::new();
        let kept: Vec<Arc<Export>> = cur
            .list
            .iter()
            .filter(|e| {
                let gone = e.lun.as_ref().is_some_and(|l| Arc::ptr_eq(l, lun));
                if gone {
                    removed.push(e.name.clone());
                }
                !gone
            })
            .cloned()
            .collect();
        let mut set = ExportSet::default();
        for e in kept {
            set.by_name.insert(e.name.clone(), set.list.len());
            set.list.push(e);
        }
        *cur = Arc::new(set);
        removed
    }
}

/// All exports of a running gateway, by name.
#[derive(Debug, Default, Clone)]
pub struct ExportSet {
    list: Vec<Arc<Export>>,
    by_name: HashMap<String, usize>,
}

impl ExportSet {
    pub fn new(exports: Vec<Export>) -> ExportSet {
        let mut set = ExportSet::default();
        for e in exports {
            set.insert(e);
        }
        set
    }

    /// Add `e`, replacing an export of the same name.
    pub fn insert(&mut self, e: Export) {
        match self.by_name.get(&e.name) {
            Some(&i) => self.list[i] = Arc::new(e),
            None => {
                self.by_name.insert(e.name.clone(), self.list.len());
                self.list.push(Arc::new(e));
            }
        }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Export>> {
        self.by_name.get(name).map(|&i| &self.list[i])
    }

    /// The export `name` if it exists and `peer` may use it; a denied
    /// export is indistinguishable from a missing one.
    pub fn visible(&self, name: &[u8], peer: &Peer) -> Option<&Arc<Export>> {
        let name = std::str::from_utf8(name).ok()?;
        self.get(name).filter(|e| e.allows(peer))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Export>> {
        self.list.iter()
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The distinct served LUNs behind these exports.
    pub fn luns(&self) -> Vec<Arc<ServedLun>> {
        let mut seen = std::collections::HashSet::new();
        self.list
            .iter()
            .filter_map(|e| e.lun.clone())
            .filter(|l| seen.insert(Arc::as_ptr(l)))
            .collect()
    }

    /// Open (and lock) every LUN the configuration names and build its
    /// exports: `NAME/diskN` for each disk of each LUN in each pool, then
    /// the explicit `[[export]]` entries (replacing same-named pool
    /// exports). Also returns the served LUNs, one per file.
    pub fn from_config(
        cfg: &GatewayConfig,
        stats: Arc<SwitchStats>,
        engine: &IoEngine,
    ) -> Result<(ExportSet, Vec<Arc<ServedLun>>), ExportError> {
        let block = block_sizes(cfg);
        let pool_allow = cfg.allow_rules()?;
        let mut luns = LunCache::new(
            cfg.read_only,
            cfg.control.unix_path(&cfg.pools),
            stats,
            engine.clone(),
        );
        let mut set = ExportSet::default();

        for pool in &cfg.pools {
            let paths = match lun_manager::pool::list_luns(pool) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(pool = %pool.display(), error = %e, "cannot list pool directory; no exports from it");
                    continue;
                }
            };
            for path in paths {
                // With a coordinator, an RBD LUN is served only once etcd
                // makes this gateway its owner (crate::coordinator).
                if cfg.coordinator.url.is_some() && lun_manager::backing::is_rbd(&path) {
                    continue;
                }
                let lun = match luns.open(&path) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::warn!(lun = %path.display(), error = %e, "skipping LUN that cannot be served");
                        continue;
                    }
                };
                for region in lun.lun.disks() {
                    let name = format!("{}/disk{}", lun.lun.name(), region.index);
                    if let Some(prev) = set.get(&name) {
                        tracing::warn!(export = %name, first = %prev.lun_path.display(), second = %path.display(),
                            "two LUNs give the same export name; keeping the first");
                        continue;
                    }
                    let mut e = export_for(&lun, &name, region.index, cfg.read_only, block)?;
                    e.allow = pool_allow.clone();
                    set.insert(e);
                }
            }
        }

        for ec in &cfg.exports {
            let lun = luns.open(&ec.lun)?;
            let mut e = export_for(
                &lun,
                &ec.name,
                ec.disk,
                cfg.read_only || ec.read_only,
                block,
            )?;
            if ec.description.is_some() {
                e.description = ec.description.clone();
            }
            e.allow = ec.allow_rules()?;
            set.insert(e);
        }
        Ok((set, luns.open.into_values().collect()))
    }
}

/// Block sizes from the configuration.
pub fn block_sizes(cfg: &GatewayConfig) -> BlockSizes {
    BlockSizes {
        minimum: cfg.block_size.minimum.0 as u32,
        preferred: cfg.block_size.preferred.0 as u32,
        maximum: cfg.block_size.maximum.0 as u32,
    }
}

/// The pool exports of one served LUN: `NAME/diskN` for each disk.
pub fn pool_exports(
    lun: &Arc<ServedLun>,
    read_only: bool,
    block: BlockSizes,
    allow: &[AllowRule],
) -> Result<Vec<Export>, ExportError> {
    lun.lun
        .disks()
        .iter()
        .map(|r| {
            let name = format!("{}/disk{}", lun.lun.name(), r.index);
            let mut e = export_for(lun, &name, r.index, read_only, block)?;
            e.allow = allow.to_vec();
            Ok(e)
        })
        .collect()
}

fn export_for(
    served: &Arc<ServedLun>,
    name: &str,
    disk: u32,
    read_only: bool,
    block: BlockSizes,
) -> Result<Export, ExportError> {
    let lun: &Lun = &served.lun;
    let view = lun
        .disk_view(disk)
        .ok_or_else(|| ExportError::NoSuchDisk {
            name: name.to_string(),
            path: lun.path().to_path_buf(),
            disk,
        })?
        .over(served.device().clone())
        .map_err(|source| ExportError::Region {
            name: name.to_string(),
            source,
        })?;
    let mut e = Export::new(
        name.to_string(),
        view,
        read_only,
        block,
        lun.path().to_path_buf(),
    );
    e.disk_id = lun.disk_id(disk);
    e.disk = disk;
    e.lun = Some(served.clone());
    e.description = Some(match e.disk_id {
        Some(id) => format!(
            "LUN {} disk {} id {}",
            lun.name(),
            disk,
            id.iter().map(|b| format!("{b:02x}")).collect::<String>()
        ),
        None => format!("LUN {} disk {}", lun.name(), disk),
    });
    Ok(e)
}

/// Opens each LUN file once, whichever pool or `[[export]]` names it.
struct LunCache {
    open: HashMap<PathBuf, Arc<ServedLun>>,
    engine: IoEngine,
    read_only: bool,
    /// The control socket the `Owner` records name.
    control: Option<PathBuf>,
    stats: Arc<SwitchStats>,
}

impl LunCache {
    fn new(
        read_only: bool,
        control: Option<PathBuf>,
        stats: Arc<SwitchStats>,
        engine: IoEngine,
    ) -> LunCache {
        LunCache {
            open: HashMap::new(),
            engine,
            read_only,
            control,
            stats,
        }
    }

    fn open(&mut self, path: &Path) -> Result<Arc<ServedLun>, ServeError> {
        let key = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        if let Some(l) = self.open.get(&key) {
            return Ok(l.clone());
        }
        let lun = Arc::new(ServedLun::open(
            path,
            self.read_only,
            self.control.as_deref(),
            self.stats.clone(),
            &self.engine,
        )?);
        self.open.insert(key, lun.clone());
        Ok(lun)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn export(size: u64, block: BlockSizes) -> Export {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(size).unwrap();
        let engine = IoEngine::new(lungate_block::engine::EngineKind::Sync, 1).unwrap();
        Export::of_file("t".into(), f.path(), 0, size, false, block, &engine).unwrap()
    }

    #[test]
    fn alignment_and_maximum() {
        let e = export(
            1 << 20,
            BlockSizes {
                minimum: 512,
                preferred: 4096,
                maximum: 65536,
            },
        );
        assert_eq!(e.check_block_sizes(512, 1024, true), Ok(()));
        assert!(matches!(
            e.check_block_sizes(100, 512, true),
            Err(RangeError::Misaligned { .. })
        ));
        assert!(matches!(
            e.check_block_sizes(0, 100, true),
            Err(RangeError::Misaligned { .. })
        ));
        assert!(matches!(
            e.check_block_sizes(0, 131072, true),
            Err(RangeError::TooLong { .. })
        ));
        assert_eq!(e.check_block_sizes(0, 131072, false), Ok(()));
    }

    #[test]
    fn denied_export_is_invisible() {
        let mut e = export(4096, BlockSizes::default());
        e.name = "vm/disk0".into();
        e.allow = vec!["10.0.0.0/8".parse().unwrap()];
        let set = ExportSet::new(vec![e]);
        let inside = Peer {
            ip: Some("10.1.2.3".parse().unwrap()),
            cert_names: vec![],
        };
        let outside = Peer {
            ip: Some("127.0.0.1".parse().unwrap()),
            cert_names: vec![],
        };
        assert!(set.visible(b"vm/disk0", &inside).is_some());
        assert!(set.visible(b"vm/disk0", &outside).is_none());
        assert!(set.visible(b"nope", &inside).is_none());
        assert!(set.visible(&[0xff, 0xfe], &inside).is_none());
    }
}
