//! Where a LUN's bytes live: a file or block device (a path), or an RBD
//! image (`rbd:POOL[/NAMESPACE]/NAME.lun`, with the `rbd` feature). A
//! [`Backing`] gives the LUN code one byte interface for both (the store's
//! [`Object`]) and builds the LUN's volume on the matching store: the file
//! store beside a file, the RBD store (native snapshots) for an image.
//!
//! Everything else in this crate names a LUN by a `Path`; an RBD LUN's
//! path is its `rbd:` location, which no file operation is ever asked to
//! open (everything that opens, creates, removes or lists goes through
//! here or [`crate::pool`]).

use std::fs::{File, OpenOptions};
use std::path::Path;
use std::sync::Arc;

use lungate_block::store::file::FileObject;
use lungate_block::store::Object;
use lungate_block::volume::{StoreVolume, Volume};

use crate::error::{Error, IoContext, Result};
use crate::format::label::Label;
use crate::lun::Access;

/// Whether `path` names an RBD image or pool rather than a file.
pub fn is_rbd(path: &Path) -> bool {
    path.to_str().is_some_and(|s| s.starts_with("rbd:"))
}

/// The pool a LUN lives in: its directory, or for an RBD image
/// `rbd:POOL[/NS]/NAME.lun[:OPTIONS]` the pool `rbd:POOL[/NS][:OPTIONS]`
/// (the options, such as `conf=FILE`, may hold '/' themselves).
pub fn pool_of(path: &Path) -> std::path::PathBuf {
    if is_rbd(path) {
        let s = path.to_string_lossy();
        let (head, opts) = match s[4..].find(':') {
            Some(i) => s.split_at(4 + i),
            None => (&s[..], ""),
        };
        let pool = head.rsplit_once('/').map_or(head, |(p, _)| p);
        return format!("{pool}{opts}").into();
    }
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    }
}

fn takeovers() -> &'static std::sync::Mutex<std::collections::HashMap<std::path::PathBuf, String>> {
    static T: std::sync::OnceLock<
        std::sync::Mutex<std::collections::HashMap<std::path::PathBuf, String>>,
    > = std::sync::OnceLock::new();
    T.get_or_init(Default::default)
}

/// Let this process take over the RBD image at `path` from `former`, the
/// lock owner (librados client address) of its last coordinated owner:
/// the next read-write open breaks that owner's exclusive lock, which
/// blocklists it at the OSDs (its later writes fail), then takes the lock.
/// A lock held by anyone else is never broken (the open fails). Only for
/// a gateway the coordinator (etcd) has just made the LUN's one owner, so
/// `former` has lost its lease: it is dead or partitioned. `None` clears
/// the permission. See docs/scale-out.md.
pub fn set_takeover(path: &Path, former: Option<String>) {
    let mut t = takeovers().lock().unwrap_or_else(|e| e.into_inner());
    match former {
        Some(f) => t.insert(path.to_path_buf(), f),
        None => t.remove(path),
    };
}

/// The former owner [`set_takeover`] allows to be fenced at `path`.
pub fn takeover(path: &Path) -> Option<String> {
    takeovers()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(path)
        .cloned()
}

/// What [`Backing::rbd_lock`] does to the image's exclusive lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockOp {
    Release,
    Acquire,
    /// Break this owner's lock (librbd blocklists it first).
    Break(String),
}

/// The bytes of one LUN, opened.
#[derive(Clone)]
pub struct Backing {
    /// Every byte of the LUN.
    pub base: Arc<dyn Object>,
    /// The file, for a file or block-device LUN.
    pub file: Option<Arc<File>>,
    #[cfg(feature = "rbd")]
    pub rbd: Option<(
        lungate_block::store::rbd::ImageSpec,
        Arc<lungate_block::store::rbd::RbdObject>,
    )>,
}

impl std::fmt::Debug for Backing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backing")
            .field("base", &self.base.name())
            .finish()
    }
}

#[cfg(not(feature = "rbd"))]
fn no_rbd(path: &Path) -> Error {
    Error::Invalid(format!(
        "{}: this build has no Ceph RBD support (build with the cargo feature `rbd`)",
        path.display()
    ))
}

#[cfg(feature = "rbd")]
pub(crate) fn image_spec(path: &Path) -> Result<lungate_block::store::rbd::ImageSpec> {
    lungate_block::store::rbd::ImageSpec::parse(&path.to_string_lossy()).map_err(Error::Invalid)
}

impl Backing {
    pub fn from_file(path: &Path, file: File) -> Backing {
        let file = Arc::new(file);
        Backing {
            base: Arc::new(FileObject::new(path.to_path_buf(), file.clone(), None)),
            file: Some(file),
            #[cfg(feature = "rbd")]
            rbd: None,
        }
    }

    /// A new clone's image, already open (and locked) as a store object.
    #[cfg(feature = "rbd")]
    pub fn from_rbd_object(
        spec: lungate_block::store::rbd::ImageSpec,
        base: Arc<dyn Object>,
    ) -> Backing {
        use lungate_block::store::rbd::RbdObject;
        // The same object (its live slot shared): a revert's swap reaches
        // the backing too.
        let rbd = base
            .rbd_object()
            .map(|o: &RbdObject| (spec, Arc::new(o.clone())));
        Backing {
            base,
            file: None,
            rbd,
        }
    }

    /// Open the LUN bytes at `path`.
    pub fn open(path: &Path, access: Access) -> Result<Backing> {
        if is_rbd(path) {
            return Self::open_rbd(path, access);
        }
        let file = OpenOptions::new()
            .read(true)
            .write(access == Access::ReadWrite)
            .open(path)
            .ctx(path, "open")?;
        Ok(Self::from_file(path, file))
    }

    #[cfg(not(feature = "rbd"))]
    fn open_rbd(path: &Path, _access: Access) -> Result<Backing> {
        Err(no_rbd(path))
    }

    #[cfg(feature = "rbd")]
    fn open_rbd(path: &Path, access: Access) -> Result<Backing> {
        use lungate_block::store::rbd::{Pool, RbdObject};
        let spec = image_spec(path)?;
        let pool = Arc::new(Pool::open(&spec.pool).ctx(path, "connect to the RBD pool")?);
        let img = pool
            .open_image(&spec.image, access == Access::ReadWrite)
            .map_err(|source| match source.raw_os_error() {
                Some(libc::ENOENT) => Error::NotALun {
                    path: path.into(),
                    why: "no such RBD image".into(),
                },
                _ => Error::Io {
                    path: path.into(),
                    op: "open RBD image",
                    source,
                },
            })?;
        if let (Access::ReadWrite, Some(former)) = (access, takeover(path)) {
            // Fence the former owner first (see `set_takeover`).
            let owners = img.lock_owners().map_err(|source| Error::Io {
                path: path.into(),
                op: "read the RBD lock owners",
                source,
            })?;
            for o in owners {
                if o != former {
                    return Err(Error::Io {
                        path: path.into(),
                        op: "take the RBD exclusive lock",
                        source: std::io::Error::other(format!(
                            "held by {o}, which is not this LUN's former coordinated owner ({former}); not broken"
                        )),
                    });
                }
                tracing::warn!(lun = %path.display(), owner = %o, "breaking a former owner's RBD lock (it is blocklisted)");
                img.lock_break(&o).map_err(|source| Error::Io {
                    path: path.into(),
                    op: "break the former owner's RBD lock",
                    source,
                })?;
            }
        }
        if access == Access::ReadWrite {
            // The ownership lock of an RBD LUN (see `owner`): taken on this
            // handle, which does the LUN's I/O, and kept until it closes.
            img.lock_acquire().map_err(|source| Error::Io {
                path: path.into(),
                op: "take the RBD exclusive lock (another client holds it: stop it or use its control API)",
                source,
            })?;
        }
        let img = Arc::new(img);
        // The LUN's bytes are where its manifest says (a revert clone after
        // a revert: see lungate_block::store::rbd): opened, fenced and
        // locked like the LUN image, before anything reads its label.
        let live =
            lungate_block::store::rbd::live_image(&img).ctx(path, "read the RBD manifest")?;
        let obj = match live {
            None => Arc::new(RbdObject::new(img, path.to_path_buf())),
            Some(name) => {
                let limg = pool
                    .open_image(&name, access == Access::ReadWrite)
                    .ctx(path, "open the LUN's live RBD image")?;
                if let (Access::ReadWrite, Some(former)) = (access, takeover(path)) {
                    for o in limg.lock_owners().ctx(path, "read the RBD lock owners")? {
                        if o == former {
                            limg.lock_break(&o)
                                .ctx(path, "break the former owner's RBD lock")?;
                        }
                    }
                }
                if access == Access::ReadWrite {
                    limg.lock_acquire()
                        .ctx(path, "take the live RBD image's exclusive lock")?;
                }
                Arc::new(RbdObject::with_live(
                    img,
                    Arc::new(limg),
                    path.to_path_buf(),
                ))
            }
        };
        Ok(Backing {
            base: obj.clone(),
            file: None,
            rbd: Some((spec, obj)),
        })
    }

    /// Create the bytes of a new LUN at `path`, `size` bytes long (a file
    /// that must not exist yet, or an image).
    #[cfg(feature = "rbd")]
    pub fn create_rbd(path: &Path, size: u64) -> Result<Backing> {
        use lungate_block::store::rbd::Pool;
        let spec = image_spec(path)?;
        let pool = Pool::open(&spec.pool).ctx(path, "connect to the RBD pool")?;
        pool.create(&spec.image, size)
            .map_err(|source| match source.raw_os_error() {
                Some(libc::EEXIST) => Error::Exists { path: path.into() },
                _ => Error::Io {
                    path: path.into(),
                    op: "create RBD image",
                    source,
                },
            })?;
        Self::open(path, Access::ReadWrite)
    }

    #[cfg(not(feature = "rbd"))]
    pub fn create_rbd(path: &Path, _size: u64) -> Result<Backing> {
        Err(no_rbd(path))
    }

    pub fn is_rbd(&self) -> bool {
        self.file.is_none()
    }

    /// Who holds the RBD exclusive lock of the image (librbd's owner
    /// strings: librados client addresses); `None` for a file LUN. Read on
    /// a LUN this process opened read-write, it names this process.
    pub fn rbd_lock_owners(&self) -> Option<std::io::Result<Vec<String>>> {
        #[cfg(feature = "rbd")]
        if let Some((_, obj)) = &self.rbd {
            return Some(obj.image().lock_owners());
        }
        None
    }

    /// Release, take again or break the RBD exclusive lock of the image
    /// this LUN does its I/O on (a planned handover: the source releases
    /// it once its I/O is paused and flushed, and takes it back on an
    /// abort); `None` for a file LUN.
    pub fn rbd_lock(&self, op: &LockOp) -> Option<std::io::Result<()>> {
        #[cfg(feature = "rbd")]
        if let Some((_, obj)) = &self.rbd {
            // Both images of a reverted LUN: the LUN image (ownership) and
            // the one its bytes are in (fencing of its writes).
            let anchor = obj.image().clone();
            let live = obj.data();
            let imgs: Vec<_> = if Arc::ptr_eq(&anchor, &live) {
                vec![anchor]
            } else {
                match op {
                    LockOp::Release => vec![live, anchor],
                    _ => vec![anchor, live],
                }
            };
            return Some(imgs.iter().try_for_each(|img| match op {
                LockOp::Release => img.lock_release(),
                LockOp::Acquire => img.lock_acquire(),
                LockOp::Break(owner) => {
                    if img.lock_owners()?.contains(owner) {
                        img.lock_break(owner)
                    } else {
                        Ok(())
                    }
                }
            }));
        }
        let _ = op;
        None
    }

    /// A small named note kept with the LUN's bytes (an RBD image's
    /// metadata key): where an RBD LUN keeps what a file LUN keeps in a
    /// file beside it (the group's intent). `None` for a file LUN.
    pub fn note_get(&self, key: &str) -> Option<std::io::Result<Option<String>>> {
        #[cfg(feature = "rbd")]
        if let Some((_, obj)) = &self.rbd {
            return Some(obj.image().metadata_get(key));
        }
        let _ = key;
        None
    }

    /// Set a note (one atomic update); `None` for a file LUN.
    pub fn note_set(&self, key: &str, value: Option<&str>) -> Option<std::io::Result<()>> {
        #[cfg(feature = "rbd")]
        if let Some((_, obj)) = &self.rbd {
            return Some(match value {
                Some(v) => obj.image().metadata_set(key, v),
                None => obj.image().metadata_remove(key),
            });
        }
        let _ = (key, value);
        None
    }

    /// The LUN's volume on the RBD store (its snapshots are RBD
    /// snapshots); a file LUN's volume is opened on the file store by
    /// [`Volume::open`].
    pub fn open_native_volume(
        &self,
        path: &Path,
        label: &Label,
        cfg: StoreVolume,
    ) -> Result<Volume> {
        let _ = (label, &cfg);
        #[cfg(feature = "rbd")]
        if let Some((spec, obj)) = &self.rbd {
            let (store, warnings) = lungate_block::store::rbd::RbdStore::open(
                spec.clone(),
                obj.clone(),
                label.uuid,
                label.lun_size,
            )?;
            for w in warnings {
                tracing::warn!("{w}");
            }
            return Ok(Volume::open_in(Arc::new(store), cfg)?);
        }
        Err(Error::Invalid(format!(
            "{}: no store for these LUN bytes",
            path.display()
        )))
    }

    /// Remove the LUN's bytes (the LUN is deleted; every handle closed).
    #[cfg(feature = "rbd")]
    pub fn remove_rbd(path: &Path) -> Result<()> {
        let spec = image_spec(path)?;
        lungate_block::store::rbd::remove_image(&spec).ctx(path, "remove RBD image")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_of_an_image_keeps_its_options() {
        assert_eq!(
            pool_of(Path::new("rbd:rbd/ns/vm.lun:conf=/etc/ceph/x.conf")),
            Path::new("rbd:rbd/ns:conf=/etc/ceph/x.conf")
        );
        assert_eq!(pool_of(Path::new("rbd:p/vm.lun")), Path::new("rbd:p"));
        assert_eq!(pool_of(Path::new("/a/b/vm.lun")), Path::new("/a/b"));
        assert_eq!(pool_of(Path::new("vm.lun")), Path::new("."));
    }
}
