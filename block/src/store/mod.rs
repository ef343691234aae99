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

pub mod file;
#[doc(hidden)]
pub mod hook;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use uuid::Uuid;

use crate::device::BlockDevice;
use crate::volume::manifest::{Loaded, Manifest};
use crate::volume::Result;

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
}
