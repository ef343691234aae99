//! The region view: one NBD export is one disk region of a LUN file.
//!
//! An [`Export`] owns the only translation from export offsets to file
//! offsets. Every request range is checked with checked arithmetic against
//! the export `size` before `base` is added, so nothing outside
//! `[base, base + size)` of the backing file is ever read, written, trimmed
//! or queried, whatever a client sends. This module never does I/O itself.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use lun_manager::Lun;
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

/// Why a request range was refused. Mapped to NBD errors by the session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error("offset {offset} + length {length} overflows 64 bits")]
    Overflow { offset: u64, length: u64 },
    #[error("offset {offset} + length {length} exceeds export size {size}")]
    OutOfBounds { offset: u64, length: u64, size: u64 },
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
    #[error("export {name:?}: region offset {base} + length {size} overflows 64 bits")]
    RegionOverflow { name: String, base: u64, size: u64 },
    #[error("export {name:?}: region [{base}, {end}) lies beyond the backing size {backing}")]
    RegionBeyondFile {
        name: String,
        base: u64,
        end: u64,
        backing: u64,
    },
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
#[derive(Debug)]
pub struct Export {
    pub name: String,
    pub description: Option<String>,
    pub file: Arc<File>,
    /// Region offset in the backing file.
    base: u64,
    /// Region length: the export size clients see.
    size: u64,
    pub read_only: bool,
    pub block: BlockSizes,
    pub disk_id: Option<[u8; 16]>,
    /// Disk index in the LUN.
    pub disk: u32,
    pub allow: Vec<AllowRule>,
    /// LUN file this export lives in (for logs and the final flush).
    pub lun_path: PathBuf,
    /// The served LUN (volume, gate); `None` only for bare-file views in
    /// unit tests, which go straight to the engine.
    pub lun: Option<Arc<ServedLun>>,
    pub stats: ExportStats,
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
    /// Build the view of `[base, base + size)` of `file`, whose readable
    /// size is `backing` bytes.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: String,
        file: Arc<File>,
        base: u64,
        size: u64,
        backing: u64,
        read_only: bool,
        block: BlockSizes,
        lun_path: PathBuf,
    ) -> Result<Export, ExportError> {
        let end = base
            .checked_add(size)
            .ok_or_else(|| ExportError::RegionOverflow {
                name: name.clone(),
                base,
                size,
            })?;
        if end > backing {
            return Err(ExportError::RegionBeyondFile {
                name,
                base,
                end,
                backing,
            });
        }
        Ok(Export {
            name,
            description: None,
            file,
            base,
            size,
            read_only,
            block,
            disk_id: None,
            disk: 0,
            allow: Vec::new(),
            lun_path,
            lun: None,
            stats: ExportStats::default(),
        })
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Region offset in the backing file.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Translate an export range to a file offset. The range must lie
    /// inside the export; `length` 0 at `offset == size` is allowed.
    pub fn locate(&self, offset: u64, length: u64) -> Result<u64, RangeError> {
        let end = offset
            .checked_add(length)
            .ok_or(RangeError::Overflow { offset, length })?;
        if end > self.size {
            return Err(RangeError::OutOfBounds {
                offset,
                length,
                size: self.size,
            });
        }
        // base + end <= base + size, which `new` proved does not overflow.
        Ok(self.base + offset)
    }

    /// `locate` plus the block size rules: alignment to the minimum block
    /// size always, and the maximum for payload-carrying commands.
    pub fn locate_checked(
        &self,
        offset: u64,
        length: u64,
        enforce_maximum: bool,
    ) -> Result<u64, RangeError> {
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
        self.locate(offset, length)
    }

    /// Convert a file range back to export coordinates, clipped to
    /// `[start, end)` of the export. `None` if it does not intersect.
    pub fn clip_file_range(
        &self,
        file_off: u64,
        len: u64,
        start: u64,
        end: u64,
    ) -> Option<(u64, u64)> {
        let f_end = file_off.checked_add(len)?;
        let lo = file_off.saturating_sub(self.base).max(start);
        let hi = f_end.checked_sub(self.base)?.min(end).min(self.size);
        (hi > lo).then_some((lo, hi - lo))
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
    ) -> Result<(ExportSet, Vec<Arc<ServedLun>>), ExportError> {
        let block = block_sizes(cfg);
        let pool_allow = cfg.allow_rules()?;
        let mut luns = LunCache::new(cfg.read_only, cfg.control.unix_path(&cfg.pools), stats);
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
    let region = lun
        .disks()
        .into_iter()
        .find(|r| r.index == disk)
        .ok_or_else(|| ExportError::NoSuchDisk {
            name: name.to_string(),
            path: lun.path().to_path_buf(),
            disk,
        })?;
    let backing = lun
        .file()
        .metadata()
        .map(|m| m.len())
        .ok()
        .filter(|l| *l > 0)
        .unwrap_or(u64::MAX); // block devices report 0; Lun::open checked bounds
    let mut e = Export::new(
        name.to_string(),
        lun.file().clone(),
        region.offset,
        region.length,
        backing,
        read_only,
        block,
        lun.path().to_path_buf(),
    )?;
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
    read_only: bool,
    /// The control socket the `Owner` records name.
    control: Option<PathBuf>,
    stats: Arc<SwitchStats>,
}

impl LunCache {
    fn new(read_only: bool, control: Option<PathBuf>, stats: Arc<SwitchStats>) -> LunCache {
        LunCache {
            open: HashMap::new(),
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
        )?);
        self.open.insert(key, lun.clone());
        Ok(lun)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn export(base: u64, size: u64, block: BlockSizes) -> Export {
        let f = tempfile::tempfile().unwrap();
        Export::new(
            "t".into(),
            Arc::new(f),
            base,
            size,
            u64::MAX,
            false,
            block,
            PathBuf::from("t.lun"),
        )
        .unwrap()
    }

    #[test]
    fn locate_adds_base_inside_bounds() {
        let e = export(1 << 20, 4 << 20, BlockSizes::default());
        assert_eq!(e.locate(0, 4096), Ok(1 << 20));
        assert_eq!(e.locate((4 << 20) - 1, 1), Ok((5 << 20) - 1));
        assert_eq!(e.locate(4 << 20, 0), Ok(5 << 20), "empty range at the end");
    }

    #[test]
    fn locate_refuses_past_end_and_overflow() {
        let e = export(1 << 20, 4 << 20, BlockSizes::default());
        assert_eq!(
            e.locate(4 << 20, 1),
            Err(RangeError::OutOfBounds {
                offset: 4 << 20,
                length: 1,
                size: 4 << 20
            })
        );
        assert_eq!(
            e.locate(u64::MAX, 1),
            Err(RangeError::Overflow {
                offset: u64::MAX,
                length: 1
            })
        );
        assert!(matches!(
            e.locate(u64::MAX - (1 << 20) + 1, 0),
            Err(RangeError::OutOfBounds { .. })
        ));
        assert!(matches!(
            e.locate((4 << 20) + 1, 0),
            Err(RangeError::OutOfBounds { .. })
        ));
    }

    #[test]
    fn region_past_u64_or_file_end_is_refused() {
        let f = Arc::new(tempfile::tempfile().unwrap());
        let b = BlockSizes::default();
        let p = PathBuf::from("x");
        assert!(matches!(
            Export::new(
                "a".into(),
                f.clone(),
                u64::MAX,
                2,
                u64::MAX,
                false,
                b,
                p.clone()
            ),
            Err(ExportError::RegionOverflow { .. })
        ));
        assert!(matches!(
            Export::new("a".into(), f, 100, 100, 150, false, b, p),
            Err(ExportError::RegionBeyondFile { end: 200, .. })
        ));
    }

    #[test]
    fn alignment_and_maximum() {
        let e = export(
            0,
            1 << 20,
            BlockSizes {
                minimum: 512,
                preferred: 4096,
                maximum: 65536,
            },
        );
        assert_eq!(e.locate_checked(512, 1024, true), Ok(512));
        assert!(matches!(
            e.locate_checked(100, 512, true),
            Err(RangeError::Misaligned { .. })
        ));
        assert!(matches!(
            e.locate_checked(0, 100, true),
            Err(RangeError::Misaligned { .. })
        ));
        assert!(matches!(
            e.locate_checked(0, 131072, true),
            Err(RangeError::TooLong { .. })
        ));
        assert_eq!(e.locate_checked(0, 131072, false), Ok(0));
    }

    #[test]
    fn clip_file_range_maps_back_and_clips() {
        let e = export(1000, 500, BlockSizes::default());
        // Extent covering the whole file: clipped to the request window.
        assert_eq!(e.clip_file_range(0, 10_000, 100, 300), Some((100, 200)));
        // Extent starting inside the region.
        assert_eq!(e.clip_file_range(1200, 50, 0, 500), Some((200, 50)));
        // Extent entirely before or after the region.
        assert_eq!(e.clip_file_range(0, 1000, 0, 500), None);
        assert_eq!(e.clip_file_range(1500, 100, 0, 500), None);
        assert_eq!(e.clip_file_range(u64::MAX, 10, 0, 500), None);
    }

    #[test]
    fn denied_export_is_invisible() {
        let mut e = export(0, 4096, BlockSizes::default());
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

    proptest! {
        /// Whatever offset/length a client sends, a successful locate yields
        /// a file range inside [base, base + size).
        #[test]
        fn locate_never_escapes_the_region(base in 0u64..(1u64 << 62), size in 0u64..(1u64 << 40),
                                           offset in any::<u64>(), length in any::<u32>(),
                                           near_end in any::<bool>()) {
            let e = export(base, size, BlockSizes::default());
            let offset = if near_end { size.saturating_sub(offset % 8192) } else { offset };
            if let Ok(file_off) = e.locate(offset, u64::from(length)) {
                prop_assert!(file_off >= base);
                prop_assert!(file_off + u64::from(length) <= base + size);
            } else {
                let escapes = match offset.checked_add(u64::from(length)) {
                    None => true,
                    Some(end) => end > size,
                };
                prop_assert!(escapes);
            }
        }
    }
}
