//! Where a volume keeps its layers: the store interface.
//!
//! A volume reaches its bytes only through a [`Store`]: the LUN itself (the
//! base [`Object`]), and named layer objects it creates, opens, lists and
//! removes, plus the manifest, which the store updates atomically. An
//! [`Object`] is a byte-addressed, growable blob: a [`BlockDevice`] for the
//! guest data path (asynchronous, io_uring for files) and a few
//! synchronous calls for metadata (headers, journals) and tools.
//!
//! [`file::FileStore`] keeps layers as files in the pool directory beside
//! the LUN (`POOL/NAME.layers/<uuid>.delta`, `manifest.0/1`); a store that
//! keeps them elsewhere (inside the LUN, in Ceph) implements the same two
//! traits and needs no change to the volume above it. See docs/store.md.
//!
//! A store whose objects keep their own snapshots ([`rbd::RbdStore`], Ceph
//! RBD, with the `rbd` feature) also provides [`NativeTree`]: it keeps no
//! layers, its volume is a chain of one (the base), and the volume hands
//! its tree operations to the store.

pub mod file;
#[doc(hidden)]
pub mod hook;
#[cfg(feature = "rbd")]
pub mod rbd;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use uuid::Uuid;

use crate::device::BlockDevice;
use crate::volume::manifest::{Loaded, Manifest};
use crate::volume::{Change, LayerUsage, Result};

/// A byte-addressed object of a store: the base LUN or one layer.
pub trait Object: BlockDevice {
    /// How messages name it (a file path; an image name for other stores).
    fn name(&self) -> &Path;
    /// Synchronous reads and writes, for metadata and tools.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Make every completed write durable (data and the length).
    fn sync(&self) -> io::Result<()>;
    /// Current length in bytes (objects grow as data is appended).
    fn byte_len(&self) -> io::Result<u64>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Make `[offset, offset + len)` read as zeros, deallocating where it
    /// can.
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Data runs `(offset, length)` in `[start, end)`; all of it where the
    /// store cannot tell.
    fn data_extents(&self, start: u64, end: u64) -> io::Result<Vec<(u64, u64)>>;
    /// Bytes it occupies in the store.
    fn stored_bytes(&self) -> u64;
    /// Hint that `[offset, offset + len)` will be read soon.
    fn will_need(&self, offset: u64, len: u64);
    /// A raw device rather than a file (no room for layers beside it).
    fn is_block_device(&self) -> bool;
    /// The RBD LUN it is, for what only an image has (its exclusive
    /// lock, its metadata, the image its live bytes are in).
    #[cfg(feature = "rbd")]
    fn rbd_object(&self) -> Option<&rbd::RbdObject> {
        None
    }
}

/// A volume's layers and manifest.
pub trait Store: Send + Sync {
    /// The base object: the LUN's own bytes, every cluster present.
    fn base(&self) -> &Arc<dyn Object>;
    /// How messages name the store (the layers directory).
    fn location(&self) -> &Path;
    /// Whether the store holds a manifest or layers yet (a plain volume's
    /// store holds neither).
    fn exists(&self) -> bool;
    /// Create layer `id` holding `initial` and `len` bytes in all (zeros
    /// past `initial`), durable, with its name.
    fn create_layer(&self, id: Uuid, initial: &[u8], len: u64) -> Result<Arc<dyn Object>>;
    fn open_layer(&self, id: Uuid, writable: bool) -> Result<Arc<dyn Object>>;
    /// Every layer object the store holds, by UUID.
    fn list_layers(&self) -> Result<Vec<Uuid>>;
    fn has_layer(&self, id: Uuid) -> bool;
    fn remove_layer(&self, id: Uuid) -> Result<()>;
    /// Both manifest copies; `None` when the store holds none.
    fn load_manifest(&self) -> Result<Option<Loaded>>;
    /// Replace the manifest atomically with generation `generation`. The
    /// first commit of a store also makes the layers created before it
    /// visible (until then a crash leaves nothing behind that counts).
    fn commit_manifest(&self, m: &Manifest, generation: u64) -> Result<()>;
    /// A name other stores can use to refer to this one (clones).
    fn reference(&self) -> PathBuf;
    /// Undo what a first commit that a crash interrupted left behind
    /// (nothing of it was ever visible); returns what it did, as warnings.
    /// Only objects of LUN `lun` are removed.
    fn recover(&self, lun: Uuid) -> Result<Vec<String>>;
    /// The store's own snapshot tree, when its objects keep their own
    /// snapshots (none for the file store: the volume's layers are the tree).
    fn native_tree(&self) -> Option<&dyn NativeTree> {
        None
    }
}

/// Tree operations of a store whose base object keeps its own snapshots
/// (Ceph RBD). The volume over such a store is a chain of one and calls
/// these for snapshot, revert, delete, clone, flatten, diff and usage,
/// under the same locks as its own (the I/O lock drained for snapshot and
/// revert). The tree is described by the same [`Manifest`] the file store
/// keeps (snapshot names, descriptions, parents, the live layer, clones),
/// so both stores report the same tree to the volume, the scanner and the
/// control API.
pub trait NativeTree: Send + Sync {
    /// The tree, `None` before the first snapshot.
    fn manifest(&self) -> Result<Option<Manifest>>;
    /// Freeze the base as snapshot `name` (the caller has flushed it).
    fn snapshot(&self, name: &str, description: &str) -> Result<()>;
    /// Bring the base back to snapshot `name`, except the `keep` ranges
    /// (offset, bytes), which keep these bytes (the label).
    fn revert(&self, name: &str, keep: &[(u64, Vec<u8>)]) -> Result<()>;
    /// The layer the next [`NativeTree::revert`] to `name` will make live,
    /// chosen ahead so that a group's intent can record it.
    fn prepare_revert(&self, name: &str) -> Result<Uuid>;
    fn delete_snapshot(&self, name: &str) -> Result<()>;
    fn read_snapshot(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// A new LUN object `target` (a name in this store's pool) whose bytes
    /// are snapshot `name`'s, sharing them copy-on-write; it belongs to LUN
    /// `target_lun`. Returns its store.
    fn clone_to(&self, name: &str, target: &str, target_lun: Uuid) -> Result<Arc<dyn Store>>;
    /// Copy what a clone reads from its parent into it and cut the link;
    /// `progress(done, total)` in bytes.
    fn flatten(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<()>;
    /// Extents that may differ between snapshot `from` and snapshot `to`
    /// (the live base when `None`), with what `to` holds there.
    fn diff(&self, from: &str, to: Option<&str>) -> Result<Vec<Change>>;
    fn usage(&self) -> Result<Vec<LayerUsage>>;
    /// Clones whose bytes still come partly from our snapshots.
    fn dependents(&self) -> Vec<PathBuf>;
    /// Remove the snapshots and the object itself (the LUN is deleted).
    fn destroy(&self) -> Result<()>;
    /// Forget a tree that records nothing any more (every snapshot was
    /// deleted, no clone depends on it, no parent beyond the base), so the
    /// object reads as one that never had a snapshot and its owner may
    /// change its size. Whether it did (`false`: it records something).
    fn forget_if_empty(&self) -> Result<bool> {
        Ok(false)
    }
}
