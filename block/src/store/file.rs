//! The file store: a volume's layers as files in the pool directory.
//!
//! ```text
//! POOL/vm.lun                 the base object (or a block device)
//! POOL/vm.layers/manifest.0   the manifest, two complete copies
//! POOL/vm.layers/manifest.1
//! POOL/vm.layers/<uuid>.delta one file per layer object
//! ```
//!
//! The directory is created under the name `vm.layers.new` with the first
//! layers and both manifest slots in it, and renamed into place by the
//! first manifest commit, so no crash leaves a `vm.layers` without a
//! manifest. Objects do their asynchronous I/O through the [`IoEngine`]
//! the store was given; without one (tools, tests) they do it inline.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use uuid::Uuid;

use super::{Object, Store};
use crate::device::{done, BlockDevice, Caps, Extent, IoFuture};
use crate::engine::IoEngine;
use crate::sys;
use crate::volume::error::{IoCtx, Result};
use crate::volume::layer::read_header;
use crate::volume::manifest::{self, Loaded, Manifest};

/// A file (or block device) as a store object.
pub struct FileObject {
    path: PathBuf,
    file: Arc<File>,
    engine: Option<IoEngine>,
    block_device: bool,
}

impl std::fmt::Debug for FileObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileObject")
            .field("path", &self.path)
            .finish()
    }
}

impl FileObject {
    pub fn new(path: PathBuf, file: Arc<File>, engine: Option<IoEngine>) -> FileObject {
        let block_device = sys::is_block_device(&file).unwrap_or(false);
        FileObject {
            path,
            file,
            engine,
            block_device,
        }
    }

    pub fn open(path: &Path, writable: bool, engine: Option<IoEngine>) -> io::Result<FileObject> {
        let file = OpenOptions::new().read(true).write(writable).open(path)?;
        Ok(FileObject::new(path.to_path_buf(), Arc::new(file), engine))
    }

    pub fn file(&self) -> &Arc<File> {
        &self.file
    }
}

impl BlockDevice for FileObject {
    fn size(&self) -> u64 {
        sys::backing_size(&self.file).unwrap_or(0)
    }

    fn caps(&self) -> Caps {
        Caps {
            writable: true,
            flush: true,
            trim: true,
            fast_zero: true,
            extents: true,
        }
    }

    fn read(&self, offset: u64, len: usize) -> IoFuture<Bytes> {
        match &self.engine {
            Some(e) => {
                let (e, f) = (e.clone(), self.file.clone());
                Box::pin(async move { e.read(&f, offset, len).await })
            }
            None => {
                let mut b = vec![0u8; len];
                done(self.file.read_exact_at(&mut b, offset).map(|()| b.into()))
            }
        }
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> IoFuture<()> {
        match &self.engine {
            Some(e) => {
                let (e, f) = (e.clone(), self.file.clone());
                Box::pin(async move { e.write(&f, offset, data, fua).await })
            }
            None => done(self.file.write_all_at(&data, offset).and_then(|()| {
                if fua {
                    self.file.sync_data()
                } else {
                    Ok(())
                }
            })),
        }
    }

    fn flush(&self) -> IoFuture<()> {
        match &self.engine {
            Some(e) => {
                let (e, f) = (e.clone(), self.file.clone());
                Box::pin(async move { e.flush(&f).await })
            }
            None => done(self.file.sync_data()),
        }
    }

    fn trim(&self, offset: u64, len: u64) -> IoFuture<()> {
        match &self.engine {
            Some(e) => {
                let (e, f) = (e.clone(), self.file.clone());
                Box::pin(async move { e.punch_hole(&f, offset, len).await })
            }
            None => done(sys::zero_range(&self.file, offset, len)),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> IoFuture<()> {
        match &self.engine {
            Some(e) => {
                let (e, f) = (e.clone(), self.file.clone());
                Box::pin(async move { e.write_zeroes(&f, offset, len, may_trim).await })
            }
            None => done(sys::zero_range(&self.file, offset, len)),
        }
    }

    fn extents(&self, offset: u64, len: u64) -> IoFuture<Vec<Extent>> {
        done(sys::extents(&self.file, offset, len))
    }

    fn cache(&self, offset: u64, len: u64) -> IoFuture<()> {
        self.will_need(offset, len);
        done(Ok(()))
    }
}

impl Object for FileObject {
    fn name(&self) -> &Path {
        &self.path
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn byte_len(&self) -> io::Result<u64> {
        sys::backing_size(&self.file)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        sys::zero_range(&self.file, offset, len)
    }
    fn data_extents(&self, start: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
        sys::data_extents(&self.file, start, end)
    }
    fn stored_bytes(&self) -> u64 {
        self.file.metadata().map(|m| m.blocks() * 512).unwrap_or(0)
    }
    fn will_need(&self, offset: u64, len: u64) {
        if let Err(e) = sys::will_need(&self.file, offset, len) {
            tracing::debug!(path = %self.path.display(), error = %e, "cache hint ignored");
        }
    }
    fn is_block_device(&self) -> bool {
        self.block_device
    }
}

/// A volume's layers directory beside its LUN file.
pub struct FileStore {
    dir: PathBuf,
    base: Arc<dyn Object>,
    engine: Option<IoEngine>,
    /// The directory is in place (not only its staging copy).
    published: AtomicBool,
    writable: bool,
}

impl std::fmt::Debug for FileStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileStore").field("dir", &self.dir).finish()
    }
}

/// `POOL/NAME.lun` → `POOL/NAME.layers`.
pub fn layers_dir(lun_path: &Path) -> PathBuf {
    match lun_path.extension() {
        Some(e) if e == "lun" => lun_path.with_extension("layers"),
        _ => {
            let mut s = lun_path.as_os_str().to_os_string();
            s.push(".layers");
            PathBuf::from(s)
        }
    }
}

/// `NAME.layers.new`: where the first layers are made before the rename
/// that publishes the directory.
pub fn staging_dir(dir: &Path) -> PathBuf {
    let mut s = dir.as_os_str().to_os_string();
    s.push(".new");
    PathBuf::from(s)
}

pub fn delta_path(dir: &Path, id: Uuid) -> PathBuf {
    dir.join(format!("{id}.delta"))
}

/// The directory holding `p` (`.` for a bare file name).
pub fn parent_dir(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

impl FileStore {
    /// The store of the LUN at `lun_path` whose bytes are `base`.
    pub fn new(
        lun_path: &Path,
        base: Arc<File>,
        engine: Option<IoEngine>,
        writable: bool,
    ) -> FileStore {
        let dir = layers_dir(lun_path);
        let published = dir.is_dir();
        FileStore {
            base: Arc::new(FileObject::new(
                lun_path.to_path_buf(),
                base,
                engine.clone(),
            )),
            dir,
            engine,
            published: AtomicBool::new(published),
            writable,
        }
    }

    /// Where layers go now: the directory, or its staging copy before the
    /// first commit.
    fn current_dir(&self) -> PathBuf {
        if self.published.load(Ordering::Acquire) {
            self.dir.clone()
        } else {
            staging_dir(&self.dir)
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn engine(&self) -> Option<&IoEngine> {
        self.engine.as_ref()
    }
}

impl Store for FileStore {
    fn base(&self) -> &Arc<dyn Object> {
        &self.base
    }

    fn location(&self) -> &Path {
        &self.dir
    }

    fn exists(&self) -> bool {
        self.published.load(Ordering::Acquire)
    }

    fn create_layer(&self, id: Uuid, initial: &[u8], len: u64) -> Result<Arc<dyn Object>> {
        let dir = self.current_dir();
        if !self.published.load(Ordering::Acquire) && !dir.is_dir() {
            std::fs::create_dir(&dir).ctx(&dir, "create layers directory")?;
            manifest::sync_dir(&parent_dir(&dir))?;
        }
        let path = delta_path(&dir, id);
        let f = manifest::create_file(&path, initial)?;
        f.set_len(len).ctx(&path, "size layer file")?;
        f.sync_all().ctx(&path, "fsync layer file")?;
        manifest::sync_dir(&dir)?;
        Ok(Arc::new(FileObject::new(
            path,
            Arc::new(f),
            self.engine.clone(),
        )))
    }

    fn open_layer(&self, id: Uuid, writable: bool) -> Result<Arc<dyn Object>> {
        let path = delta_path(&self.current_dir(), id);
        let o = FileObject::open(&path, writable && self.writable, self.engine.clone())
            .ctx(&path, "open layer")?;
        Ok(Arc::new(o))
    }

    fn list_layers(&self) -> Result<Vec<Uuid>> {
        let dir = self.current_dir();
        if !dir.is_dir() {
            return Ok(vec![]);
        }
        let mut out = Vec::new();
        for e in std::fs::read_dir(&dir).ctx(&dir, "list layers directory")? {
            let e = e.ctx(&dir, "list layers directory")?;
            let name = e.file_name();
            if let Some(id) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".delta"))
                .and_then(|s| Uuid::parse_str(s).ok())
            {
                out.push(id);
            }
        }
        out.sort();
        Ok(out)
    }

    fn has_layer(&self, id: Uuid) -> bool {
        delta_path(&self.current_dir(), id)
            .symlink_metadata()
            .is_ok()
    }

    fn remove_layer(&self, id: Uuid) -> Result<()> {
        let p = delta_path(&self.current_dir(), id);
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).ctx(&p, "remove layer"),
        }
    }

    fn load_manifest(&self) -> Result<Option<Loaded>> {
        if !self.dir.is_dir() {
            return Ok(None);
        }
        manifest::load(&self.dir)
    }

    fn commit_manifest(&self, m: &Manifest, generation: u64) -> Result<()> {
        if self.published.load(Ordering::Acquire) {
            return manifest::store(&self.dir, m, generation);
        }
        let staging = staging_dir(&self.dir);
        manifest::store(&staging, m, generation)?;
        std::fs::rename(&staging, &self.dir).ctx(&self.dir, "publish layers directory")?;
        manifest::sync_dir(&parent_dir(&self.dir))?;
        self.published.store(true, Ordering::Release);
        Ok(())
    }

    fn reference(&self) -> PathBuf {
        PathBuf::from(self.dir.file_name().unwrap_or_default())
    }

    fn recover(&self, lun: Uuid) -> Result<Vec<String>> {
        let mut w = Vec::new();
        if !self.published.load(Ordering::Acquire) || self.writable {
            discard_unpublished(&staging_dir(&self.dir), lun, &mut w)?;
        }
        Ok(w)
    }
}

/// Whether `file` (in a layers directory) is a manifest slot or a layer
/// file of LUN `lun`.
fn layer_file_of(path: &Path, lun: Uuid) -> bool {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    match name.as_deref() {
        Some("manifest.0" | "manifest.1") => std::fs::read(path)
            .ok()
            .and_then(|b| manifest::decode(&b).ok())
            .is_some_and(|(m, _)| m.lun == lun),
        Some(n) if n.ends_with(".delta") => FileObject::open(path, false, None)
            .ok()
            .and_then(|o| read_header(&o).ok())
            .is_some_and(|(h, _, _)| h.lun == lun),
        _ => false,
    }
}

/// The regular files in `dir` (a real directory, not a symlink), or none.
fn regular_entries(dir: &Path) -> Option<Vec<(PathBuf, bool)>> {
    if !dir.symlink_metadata().is_ok_and(|m| m.is_dir()) {
        return None;
    }
    let rd = std::fs::read_dir(dir).ok()?;
    Some(
        rd.filter_map(|e| e.ok())
            .map(|e| (e.path(), e.file_type().is_ok_and(|t| t.is_file())))
            .collect(),
    )
}

/// Whether the layers directory `dir` holds a manifest slot or a layer
/// file of LUN `lun` (proof that LUN's volume made it).
pub fn layers_belong_to(dir: &Path, lun: Uuid) -> bool {
    regular_entries(dir).is_some_and(|es| es.iter().any(|(p, file)| *file && layer_file_of(p, lun)))
}

/// Remove from layers directory `dir` the manifest slots and layer files
/// of LUN `lun`, then the directory if nothing else is left. Anything
/// else (other files, symlinks, another LUN's layers) is left alone and
/// named in the returned warnings. A missing `dir` is not an error.
pub fn remove_layers_of(dir: &Path, lun: Uuid) -> Result<Vec<String>> {
    let mut warnings = Vec::new();
    match dir.symlink_metadata() {
        Err(_) => return Ok(warnings),
        Ok(md) if !md.is_dir() => {
            warnings.push(format!("{}: not a directory; left alone", dir.display()));
            return Ok(warnings);
        }
        Ok(_) => {}
    }
    let mut kept = 0;
    for (p, file) in regular_entries(dir).unwrap_or_default() {
        if file && layer_file_of(&p, lun) {
            std::fs::remove_file(&p).ctx(&p, "remove layer file")?;
        } else {
            kept += 1;
            warnings.push(format!(
                "{}: not a layer file of LUN {lun}; left alone",
                p.display()
            ));
        }
    }
    if kept == 0 {
        std::fs::remove_dir(dir).ctx(dir, "remove layers directory")?;
        manifest::sync_dir(&parent_dir(dir))?;
    }
    Ok(warnings)
}

/// Remove the staging directory of a first snapshot or clone that a crash
/// interrupted: it was never renamed into place, so nothing in it was
/// ever served.
fn discard_unpublished(staging: &Path, lun: Uuid, warnings: &mut Vec<String>) -> Result<()> {
    if staging.symlink_metadata().is_err() {
        return Ok(());
    }
    warnings.extend(remove_layers_of(staging, lun)?);
    if staging.symlink_metadata().is_err() {
        warnings.push(format!(
            "{}: removed the layers of an interrupted first snapshot or clone",
            staging.display()
        ));
    }
    Ok(())
}

/// Where another volume of `pool` referred to by a manifest is: its layers
/// directory `dir` (a name in the pool; an absolute path in older
/// manifests, tried first and then by its name in this pool) holding the
/// manifest of LUN `lun`; failing that, whichever layers directory of the
/// pool holds LUN `lun`'s manifest (it was renamed). A clear error when it
/// is in none: the data below a clone's own layer lives there.
pub fn resolve_peer(pool: &Path, dir: &Path, lun: Option<Uuid>) -> Result<PathBuf> {
    let mut candidates = Vec::new();
    if dir.is_absolute() {
        candidates.push(dir.to_path_buf());
    }
    if let Some(name) = dir.file_name() {
        candidates.push(pool.join(name));
    }
    let holds = |d: &Path| -> bool {
        d.symlink_metadata().is_ok_and(|m| m.is_dir())
            && manifest::load(d)
                .ok()
                .flatten()
                .is_some_and(|l| lun.is_none_or(|u| l.manifest.lun == u))
    };
    if let Some(d) = candidates.iter().find(|d| holds(d)) {
        return Ok(d.clone());
    }
    if lun.is_some() {
        if let Ok(rd) = std::fs::read_dir(pool) {
            let mut found: Vec<PathBuf> = rd
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "layers") && holds(p))
                .collect();
            found.sort();
            if let Some(d) = found.into_iter().next() {
                return Ok(d);
            }
        }
    }
    Err(crate::volume::error::corrupt(
        dir,
        format!(
            "the volume this one was cloned from ({}, last seen as {}) is not in pool {}: the clone's data below its own layer lives there; move it back into the pool",
            lun.map_or("LUN unknown".to_string(), |u| format!("LUN {u}")),
            dir.display(),
            pool.display()
        ),
    ))
}

/// The base LUN file of the peer volume whose layers are in `peer_dir`,
/// from its manifest's `lun_path` (a name in the pool, or an absolute
/// path in older manifests) or the layers directory's own name.
pub fn peer_base(peer_dir: &Path, lun_path: &Path) -> Option<PathBuf> {
    let pool = parent_dir(peer_dir);
    let mut candidates = Vec::new();
    if lun_path.is_absolute() {
        candidates.push(lun_path.to_path_buf());
    }
    if let Some(name) = lun_path.file_name() {
        candidates.push(pool.join(name));
    }
    if let Some(stem) = peer_dir.file_stem() {
        let mut n = stem.to_os_string();
        n.push(".lun");
        candidates.push(pool.join(n));
    }
    candidates
        .into_iter()
        .find(|p| p.symlink_metadata().is_ok_and(|m| !m.is_dir()))
}
