//! The RBD store: a LUN as one Ceph RBD image, its snapshots as RBD
//! snapshots (only with the `rbd` cargo feature).
//!
//! ```text
//! rbd:POOL[/NAMESPACE]/NAME.lun     one image per LUN: the same bytes as a LUN file
//!   @lungate-<layer uuid>           one RBD snapshot per lungate snapshot
//!   metadata lungate.manifest       the snapshot tree (the file store's manifest, hex)
//! rbd:POOL[/NAMESPACE]/NAME.lun~<layer uuid>
//!                                   a revert's clone of a snapshot: the live bytes
//!                                   after a revert (and snapshots taken since)
//! ```
//!
//! This module owns the librados/librbd FFI ([`ffi`]) and wraps it once:
//! [`Cluster`] (a connection, shared per configuration), [`Pool`] (a pool
//! and namespace), [`Image`] (an open image: asynchronous and synchronous
//! I/O, snapshots, clones, diffs, metadata, the exclusive lock). Above the
//! wrappers, [`RbdObject`] is the image as a store [`Object`] (guest I/O on
//! librbd's AIO: a completion callback wakes the request's future, no
//! thread per request) and [`RbdStore`] the image as a [`Store`] that keeps
//! no layers of its own but provides [`NativeTree`]: the volume hands its
//! snapshot, revert, clone, flatten, diff and usage to RBD (`rbd/tree.rs`,
//! and docs/scale-out.md).
//!
//! It must not know the LUN format: it stores bytes and the manifest the
//! volume's tree is described by.

mod ffi;
mod tree;

pub use tree::{live_image, remove_image, RbdStore};

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::io;
use std::os::raw::{c_char, c_int, c_void};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use bytes::{Bytes, BytesMut};
use tokio::sync::oneshot;

use crate::device::{done, BlockDevice, Caps, Extent, IoFuture};

// ----- errors ----------------------------------------------------------------

/// librbd and librados return negative errnos.
fn check(r: c_int) -> io::Result<c_int> {
    if r < 0 {
        Err(io::Error::from_raw_os_error(-r))
    } else {
        Ok(r)
    }
}

fn check_len(r: isize) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::from_raw_os_error(
            i32::try_from(-r).unwrap_or(libc::EIO),
        ))
    } else {
        Ok(r as usize)
    }
}

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{s:?} contains a NUL byte"),
        )
    })
}

// ----- locations -------------------------------------------------------------

/// Where an RBD pool is: `rbd:POOL[/NAMESPACE][:id=USER][:conf=FILE]`
/// (the option syntax is QEMU's for its `rbd:` URIs).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolSpec {
    pub pool: String,
    pub namespace: Option<String>,
    /// Cluster configuration file (default: librados's own search,
    /// `$CEPH_CONF` then `/etc/ceph/ceph.conf`).
    pub conf: Option<PathBuf>,
    /// The cephx user, without `client.` (default: `admin`).
    pub id: Option<String>,
}

/// Where an RBD LUN is: a pool and an image name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageSpec {
    pub pool: PoolSpec,
    pub image: String,
}

pub const SCHEME: &str = "rbd:";

/// Whether `p` names an RBD location (`rbd:…`) rather than a file.
pub fn is_rbd(p: &Path) -> bool {
    p.to_str().is_some_and(|s| s.starts_with(SCHEME))
}

fn split_options(s: &str) -> Result<(&str, Option<PathBuf>, Option<String>), String> {
    let mut parts = s.split(':');
    let head = parts.next().unwrap_or_default();
    let (mut conf, mut id) = (None, None);
    for opt in parts {
        match opt.split_once('=') {
            Some(("conf", v)) if !v.is_empty() => conf = Some(PathBuf::from(v)),
            Some(("id", v)) if !v.is_empty() => id = Some(v.to_string()),
            _ => {
                return Err(format!(
                    "unknown RBD option {opt:?} (expected id=USER or conf=FILE)"
                ))
            }
        }
    }
    Ok((head, conf, id))
}

fn valid_name(what: &str, s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 256 || s.contains(['/', '@', ':', '\0']) || s.starts_with('.') {
        return Err(format!(
            "RBD {what} {s:?} must be 1 to 256 bytes without '/', '@', ':' or a leading '.'"
        ));
    }
    Ok(())
}

impl PoolSpec {
    /// Parse `rbd:POOL[/NAMESPACE][:id=USER][:conf=FILE]`.
    pub fn parse(s: &str) -> Result<PoolSpec, String> {
        let rest = s
            .strip_prefix(SCHEME)
            .ok_or_else(|| format!("{s:?} is not an RBD pool (rbd:POOL[/NAMESPACE])"))?;
        let (head, conf, id) = split_options(rest)?;
        let (pool, namespace) = match head.split_once('/') {
            Some((p, n)) => (p, Some(n)),
            None => (head, None),
        };
        valid_name("pool", pool)?;
        if let Some(n) = namespace {
            valid_name("namespace", n)?;
        }
        Ok(PoolSpec {
            pool: pool.into(),
            namespace: namespace.map(str::to_string),
            conf,
            id,
        })
    }

    /// The spec as a path-like name, `rbd:POOL[/NAMESPACE]` plus options.
    pub fn display(&self) -> String {
        let mut s = format!("{SCHEME}{}", self.pool);
        if let Some(n) = &self.namespace {
            s.push('/');
            s.push_str(n);
        }
        self.push_options(&mut s);
        s
    }

    fn push_options(&self, s: &mut String) {
        if let Some(id) = &self.id {
            s.push_str(":id=");
            s.push_str(id);
        }
        if let Some(c) = &self.conf {
            s.push_str(":conf=");
            s.push_str(&c.display().to_string());
        }
    }

    /// The LUN image `image` of this pool.
    pub fn image(&self, image: &str) -> ImageSpec {
        ImageSpec {
            pool: self.clone(),
            image: image.into(),
        }
    }
}

impl ImageSpec {
    /// Parse `rbd:POOL[/NAMESPACE]/IMAGE[:id=USER][:conf=FILE]`: the last
    /// path component is the image.
    pub fn parse(s: &str) -> Result<ImageSpec, String> {
        let rest = s
            .strip_prefix(SCHEME)
            .ok_or_else(|| format!("{s:?} is not an RBD image (rbd:POOL[/NAMESPACE]/IMAGE)"))?;
        let (head, conf, id) = split_options(rest)?;
        let mut comps: Vec<&str> = head.split('/').collect();
        if !(2..=3).contains(&comps.len()) {
            return Err(format!(
                "{s:?} is not an RBD image (rbd:POOL[/NAMESPACE]/IMAGE)"
            ));
        }
        let image = comps.pop().expect("two or three components").to_string();
        valid_name("image", &image)?;
        let mut pool = PoolSpec::parse(&format!("{SCHEME}{}", comps.join("/")))?;
        pool.conf = conf;
        pool.id = id;
        Ok(ImageSpec { pool, image })
    }

    /// `rbd:POOL[/NAMESPACE]/IMAGE` plus options: what a LUN's "path" is.
    pub fn display(&self) -> String {
        let mut s = format!("{SCHEME}{}", self.pool.pool);
        if let Some(n) = &self.pool.namespace {
            s.push('/');
            s.push_str(n);
        }
        s.push('/');
        s.push_str(&self.image);
        self.pool.push_options(&mut s);
        s
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(self.display())
    }
}

// ----- the cluster connection --------------------------------------------------

/// A connection to a Ceph cluster (`rados_t`). One per configuration and
/// process ([`Cluster::connect`] shares it): every LUN of a gateway speaks
/// through one client instance, so fencing (a blocklist entry) covers the
/// whole gateway at once, as a partitioned gateway should be.
pub struct Cluster {
    handle: ffi::rados_t,
    key: (Option<PathBuf>, Option<String>),
}

// SAFETY: a connected `rados_t` may be used from any thread concurrently
// (librados locks internally); it is only shut down in `Drop`, when no
// other reference exists.
unsafe impl Send for Cluster {}
// SAFETY: as above; every method takes `&self` and librados serialises.
unsafe impl Sync for Cluster {}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("key", &self.key).finish()
    }
}

type ClusterKey = (Option<PathBuf>, Option<String>);

fn clusters() -> &'static Mutex<HashMap<ClusterKey, Weak<Cluster>>> {
    static C: std::sync::OnceLock<Mutex<HashMap<ClusterKey, Weak<Cluster>>>> =
        std::sync::OnceLock::new();
    C.get_or_init(Default::default)
}

impl Cluster {
    /// The connection for `conf` and `id`, made on first use.
    pub fn connect(conf: Option<&Path>, id: Option<&str>) -> io::Result<Arc<Cluster>> {
        let key = (conf.map(Path::to_path_buf), id.map(str::to_string));
        let mut map = clusters().lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = map.get(&key).and_then(Weak::upgrade) {
            return Ok(c);
        }
        let c = Arc::new(Cluster::connect_new(conf, id, key.clone())?);
        map.insert(key, Arc::downgrade(&c));
        Ok(c)
    }

    /// A connection of its own (a second client instance: tests that play
    /// two gateways in one process).
    pub fn connect_new(
        conf: Option<&Path>,
        id: Option<&str>,
        key: ClusterKey,
    ) -> io::Result<Cluster> {
        let id_c = id.map(cstr).transpose()?;
        let conf_c = conf.map(|p| cstr(&p.display().to_string())).transpose()?;
        let mut handle: ffi::rados_t = std::ptr::null_mut();
        // SAFETY: `handle` is a valid out-pointer; `id_c` outlives the call
        // (NULL means the default user).
        check(unsafe {
            ffi::rados_create(
                &mut handle,
                id_c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            )
        })?;
        let c = Cluster { handle, key };
        // SAFETY: `c.handle` was created above and is not connected yet;
        // the path outlives the call (NULL: librados's default search).
        check(unsafe {
            ffi::rados_conf_read_file(
                c.handle,
                conf_c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            )
        })?;
        // SAFETY: as above; NULL reads CEPH_ARGS, ceph's own convention.
        check(unsafe { ffi::rados_conf_parse_env(c.handle, std::ptr::null()) })?;
        // A lost connection must fail a request, not hang it forever: the
        // NBD client retries and another gateway may take over.
        //
        // No librbd cache. A write is answered once the OSDs have it and a
        // flush once they made it durable, which the NBD client's own
        // cache relies on. With librbd's writeback cache a fenced gateway
        // (its lock broken, its client blocklisted) drops the dirty data
        // when librbd notices, and a FLUSH still succeeds afterwards: a
        // write answered as durable that is lost (seen in the failover
        // test). The cache would also keep a second copy of guest data in
        // memory that no bound of ours covers.
        for (k, v) in [
            ("rados_osd_op_timeout", "30"),
            ("rados_mon_op_timeout", "30"),
            ("client_mount_timeout", "30"),
            ("rbd_cache", "false"),
        ] {
            let (k, v) = (cstr(k)?, cstr(v)?);
            // SAFETY: not connected yet; both strings outlive the call.
            check(unsafe { ffi::rados_conf_set(c.handle, k.as_ptr(), v.as_ptr()) })?;
        }
        // SAFETY: configured above; a failed connect is cleaned up by Drop.
        check(unsafe { ffi::rados_connect(c.handle) })?;
        Ok(c)
    }

    /// An I/O context on `spec`'s pool and namespace.
    pub fn pool(self: &Arc<Self>, spec: &PoolSpec) -> io::Result<Pool> {
        let name = cstr(&spec.pool)?;
        let mut io: ffi::rados_ioctx_t = std::ptr::null_mut();
        // SAFETY: the cluster is connected; `io` is a valid out-pointer.
        check(unsafe { ffi::rados_ioctx_create(self.handle, name.as_ptr(), &mut io) })?;
        let p = Pool {
            io,
            cluster: self.clone(),
            spec: spec.clone(),
        };
        if let Some(ns) = &spec.namespace {
            let ns = cstr(ns)?;
            // SAFETY: `p.io` was just created; librados copies the string.
            unsafe { ffi::rados_ioctx_set_namespace(p.io, ns.as_ptr()) };
        }
        Ok(p)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: the last reference: every Pool and Image holds an Arc to
        // this cluster, so none is left that could use the handle.
        unsafe { ffi::rados_shutdown(self.handle) };
    }
}

// ----- pools -----------------------------------------------------------------

/// A pool (and namespace) I/O context (`rados_ioctx_t`).
pub struct Pool {
    io: ffi::rados_ioctx_t,
    cluster: Arc<Cluster>,
    spec: PoolSpec,
}

// SAFETY: an ioctx may be used concurrently by several threads for
// operations (librados locks internally); its namespace is set once, at
// creation, before it is shared.
unsafe impl Send for Pool {}
// SAFETY: as above.
unsafe impl Sync for Pool {}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("spec", &self.spec).finish()
    }
}

/// Features every LUN image is created with: layering (clones),
/// exclusive-lock (ownership fencing), object-map and fast-diff (cheap
/// diffs, extents and usage), deep-flatten.
pub const LUN_FEATURES: u64 = ffi::RBD_FEATURE_LAYERING
    | ffi::RBD_FEATURE_EXCLUSIVE_LOCK
    | ffi::RBD_FEATURE_OBJECT_MAP
    | ffi::RBD_FEATURE_FAST_DIFF
    | ffi::RBD_FEATURE_DEEP_FLATTEN;

/// RBD object size of LUN images: 4 MiB, librbd's default.
pub const LUN_ORDER: u64 = 22;

struct Options(ffi::rbd_image_options_t);

impl Options {
    fn lun() -> io::Result<Options> {
        let mut o: ffi::rbd_image_options_t = std::ptr::null_mut();
        // SAFETY: `o` is a valid out-pointer.
        unsafe { ffi::rbd_image_options_create(&mut o) };
        let o = Options(o);
        // SAFETY: `o.0` was created above; options take plain integers.
        check(unsafe {
            ffi::rbd_image_options_set_uint64(o.0, ffi::RBD_IMAGE_OPTION_FEATURES, LUN_FEATURES)
        })?;
        // SAFETY: as above.
        check(unsafe {
            ffi::rbd_image_options_set_uint64(o.0, ffi::RBD_IMAGE_OPTION_ORDER, LUN_ORDER)
        })?;
        Ok(o)
    }
}

impl Drop for Options {
    fn drop(&mut self) {
        // SAFETY: created by rbd_image_options_create, destroyed once.
        unsafe { ffi::rbd_image_options_destroy(self.0) };
    }
}

impl Pool {
    /// Open (connecting if needed) the pool `spec` names.
    pub fn open(spec: &PoolSpec) -> io::Result<Pool> {
        Cluster::connect(spec.conf.as_deref(), spec.id.as_deref())?.pool(spec)
    }

    pub fn spec(&self) -> &PoolSpec {
        &self.spec
    }

    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    /// Make the pool usable for RBD (`rbd pool init`) and create the
    /// namespace if it is missing.
    pub fn init(spec: &PoolSpec) -> io::Result<()> {
        let base = PoolSpec {
            namespace: None,
            ..spec.clone()
        };
        let p = Pool::open(&base)?;
        // SAFETY: a valid ioctx; `force` false keeps an initialised pool.
        check(unsafe { ffi::rbd_pool_init(p.io, false) })?;
        if let Some(ns) = &spec.namespace {
            let n = cstr(ns)?;
            let mut exists = false;
            // SAFETY: valid ioctx and string; `exists` is an out-pointer.
            check(unsafe { ffi::rbd_namespace_exists(p.io, n.as_ptr(), &mut exists) })?;
            if !exists {
                // SAFETY: as above.
                check(unsafe { ffi::rbd_namespace_create(p.io, n.as_ptr()) })?;
            }
        }
        Ok(())
    }

    /// Names of every image in the pool's namespace, sorted.
    pub fn list(&self) -> io::Result<Vec<String>> {
        let mut cap = 64usize;
        loop {
            let mut specs: Vec<ffi::rbd_image_spec_t> = (0..cap)
                .map(|_| ffi::rbd_image_spec_t {
                    id: std::ptr::null_mut(),
                    name: std::ptr::null_mut(),
                })
                .collect();
            let mut n = cap;
            // SAFETY: `specs` has room for `n` entries; librbd fills at most
            // `n` and sets `n` to the count (or the needed size with ERANGE).
            let r = unsafe { ffi::rbd_list2(self.io, specs.as_mut_ptr(), &mut n) };
            if r == -libc::ERANGE {
                cap = n.max(cap * 2);
                continue;
            }
            check(r)?;
            let mut names: Vec<String> = specs[..n]
                .iter()
                .map(|s| {
                    // SAFETY: librbd set `name` of the first `n` entries to
                    // NUL-terminated strings it allocated.
                    unsafe { CStr::from_ptr(s.name) }
                        .to_string_lossy()
                        .into_owned()
                })
                .collect();
            // SAFETY: frees exactly the `n` entries librbd filled.
            unsafe { ffi::rbd_image_spec_list_cleanup(specs.as_mut_ptr(), n) };
            names.sort();
            return Ok(names);
        }
    }

    /// Create image `name` of `size` bytes with [`LUN_FEATURES`].
    pub fn create(&self, name: &str, size: u64) -> io::Result<()> {
        let n = cstr(name)?;
        let o = Options::lun()?;
        // SAFETY: valid ioctx, name and options.
        check(unsafe { ffi::rbd_create4(self.io, n.as_ptr(), size, o.0) })?;
        Ok(())
    }

    /// Clone `parent@snap` (a protected snapshot of an image of `parent_pool`)
    /// as image `name` of this pool.
    pub fn clone_image(
        &self,
        parent_pool: &Pool,
        parent: &str,
        snap: &str,
        name: &str,
    ) -> io::Result<()> {
        let (p, s, n) = (cstr(parent)?, cstr(snap)?, cstr(name)?);
        let o = Options::lun()?;
        // SAFETY: valid ioctxs, strings and options, all outliving the call.
        check(unsafe {
            ffi::rbd_clone3(
                parent_pool.io,
                p.as_ptr(),
                s.as_ptr(),
                self.io,
                n.as_ptr(),
                o.0,
            )
        })?;
        Ok(())
    }

    pub fn remove(&self, name: &str) -> io::Result<()> {
        let n = cstr(name)?;
        // SAFETY: valid ioctx and name.
        check(unsafe { ffi::rbd_remove(self.io, n.as_ptr()) })?;
        Ok(())
    }

    pub fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let (f, t) = (cstr(from)?, cstr(to)?);
        // SAFETY: valid ioctx and names.
        check(unsafe { ffi::rbd_rename(self.io, f.as_ptr(), t.as_ptr()) })?;
        Ok(())
    }

    /// Write a whole RADOS object of the namespace (the pool marker).
    pub fn write_object(&self, oid: &str, data: &[u8]) -> io::Result<()> {
        let o = cstr(oid)?;
        // SAFETY: valid ioctx; `data` is valid for `data.len()` bytes.
        check(unsafe {
            ffi::rados_write_full(self.io, o.as_ptr(), data.as_ptr().cast(), data.len())
        })?;
        Ok(())
    }

    /// Read up to `max` bytes of a RADOS object (`None`: no such object).
    pub fn read_object(&self, oid: &str, max: usize) -> io::Result<Option<Vec<u8>>> {
        let o = cstr(oid)?;
        let mut buf = vec![0u8; max];
        // SAFETY: valid ioctx; `buf` has room for `max` bytes.
        let r = unsafe { ffi::rados_read(self.io, o.as_ptr(), buf.as_mut_ptr().cast(), max, 0) };
        if r == -libc::ENOENT {
            return Ok(None);
        }
        buf.truncate(check(r)? as usize);
        Ok(Some(buf))
    }

    /// Open image `name` (the head; `snap` for a read-only snapshot view).
    pub fn open_image(self: &Arc<Self>, name: &str, writable: bool) -> io::Result<Image> {
        let n = cstr(name)?;
        let mut img: ffi::rbd_image_t = std::ptr::null_mut();
        // SAFETY: valid ioctx and name; `img` is a valid out-pointer; NULL
        // snapshot opens the head.
        check(unsafe {
            if writable {
                ffi::rbd_open(self.io, n.as_ptr(), &mut img, std::ptr::null())
            } else {
                ffi::rbd_open_read_only(self.io, n.as_ptr(), &mut img, std::ptr::null())
            }
        })?;
        Ok(Image {
            handle: img,
            pool: self.clone(),
            name: name.to_string(),
            writable,
        })
    }

    /// Open snapshot `snap` of image `name`, read-only.
    pub fn open_snapshot(self: &Arc<Self>, name: &str, snap: &str) -> io::Result<Image> {
        let (n, s) = (cstr(name)?, cstr(snap)?);
        let mut img: ffi::rbd_image_t = std::ptr::null_mut();
        // SAFETY: valid ioctx and strings; `img` is a valid out-pointer.
        check(unsafe { ffi::rbd_open_read_only(self.io, n.as_ptr(), &mut img, s.as_ptr()) })?;
        Ok(Image {
            handle: img,
            pool: self.clone(),
            name: name.to_string(),
            writable: false,
        })
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // SAFETY: the last reference (every Image holds an Arc<Pool>).
        unsafe { ffi::rados_ioctx_destroy(self.io) };
    }
}

// ----- images ----------------------------------------------------------------

/// An open RBD image (`rbd_image_t`).
pub struct Image {
    handle: ffi::rbd_image_t,
    pool: Arc<Pool>,
    name: String,
    writable: bool,
}

// SAFETY: librbd image handles are safe to use from several threads at
// once for I/O and for the management calls used here (the ImageCtx locks
// internally); the handle is closed only in Drop, when no other reference
// exists.
unsafe impl Send for Image {}
// SAFETY: as above.
unsafe impl Sync for Image {}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image").field("name", &self.name).finish()
    }
}

/// What an AIO completion hands back to its future: the result, and the
/// buffers librbd was reading into or writing from, which must outlive the
/// request even if its future is dropped.
struct Pending {
    tx: oneshot::Sender<(isize, Option<BytesMut>)>,
    read: Option<BytesMut>,
    _write: Option<Bytes>,
}

/// The completion callback: runs once per request on a librbd thread and
/// wakes the request's future.
extern "C" fn on_complete(c: ffi::rbd_completion_t, arg: *mut c_void) {
    // SAFETY: `arg` is the `Box<Pending>` leaked by `Image::submit` for
    // this completion alone, and librbd calls this callback exactly once.
    let p = unsafe { Box::from_raw(arg.cast::<Pending>()) };
    // SAFETY: `c` is the completion this callback was registered with.
    let r = unsafe { ffi::rbd_aio_get_return_value(c) };
    // SAFETY: we own the completion; nothing touches it after this.
    unsafe { ffi::rbd_aio_release(c) };
    let Pending { tx, read, _write } = *p;
    // The future may have been dropped; the buffers are freed either way.
    let _ = tx.send((r, read));
}

/// Progress callback: `arg` is a `&mut &mut dyn FnMut(u64, u64)`.
extern "C" fn on_progress(offset: u64, total: u64, arg: *mut c_void) -> c_int {
    // SAFETY: `arg` points at the caller's `&mut dyn FnMut` for the duration
    // of the synchronous librbd call that invokes this callback.
    let f = unsafe { &mut *arg.cast::<&mut dyn FnMut(u64, u64)>() };
    f(offset, total);
    0
}

/// Diff callback: `arg` is a `&mut Vec<(u64, u64, bool)>`.
extern "C" fn on_diff(off: u64, len: usize, exists: c_int, arg: *mut c_void) -> c_int {
    // SAFETY: `arg` points at the caller's vector for the duration of the
    // synchronous rbd_diff_iterate2 call that invokes this callback.
    let v = unsafe { &mut *arg.cast::<Vec<(u64, u64, bool)>>() };
    v.push((off, len as u64, exists != 0));
    0
}

/// What kind of AIO to submit.
enum Aio {
    Read(usize),
    Write(Bytes),
    Zeroes { len: usize, thick: bool },
    Flush,
}

impl Image {
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    pub fn size(&self) -> io::Result<u64> {
        let mut s = 0u64;
        // SAFETY: valid image; `s` is an out-pointer.
        check(unsafe { ffi::rbd_get_size(self.handle, &mut s) })?;
        Ok(s)
    }

    pub fn resize(&self, size: u64) -> io::Result<()> {
        // SAFETY: valid image.
        check(unsafe { ffi::rbd_resize(self.handle, size) })?;
        Ok(())
    }

    /// Submit one asynchronous request; the future completes from librbd's
    /// completion callback.
    fn submit(
        &self,
        op: Aio,
        offset: u64,
    ) -> impl std::future::Future<Output = io::Result<Option<Bytes>>> {
        let (tx, rx) = oneshot::channel();
        let (mut read, write) = match &op {
            Aio::Read(len) => (Some(BytesMut::zeroed(*len)), None),
            Aio::Write(b) => (None, Some(b.clone())),
            _ => (None, None),
        };
        let rbuf = read.as_mut().map(|b| b.as_mut_ptr());
        let pending = Box::into_raw(Box::new(Pending {
            tx,
            read,
            _write: write,
        }));
        let mut c: ffi::rbd_completion_t = std::ptr::null_mut();
        // SAFETY: `pending` is a live heap allocation handed to the callback,
        // which reclaims it; `c` is a valid out-pointer.
        let r = unsafe { ffi::rbd_aio_create_completion(pending.cast(), on_complete, &mut c) };
        let submitted = if r < 0 {
            r
        } else {
            // SAFETY: the buffers live in `*pending` (heap, never moved) until
            // the callback runs; `c` is released by the callback, or below
            // when submission fails (then the callback never runs).
            let r = unsafe {
                match &op {
                    Aio::Read(len) => ffi::rbd_aio_read(
                        self.handle,
                        offset,
                        *len,
                        rbuf.expect("read buffer").cast::<c_char>(),
                        c,
                    ),
                    Aio::Write(b) => {
                        ffi::rbd_aio_write(self.handle, offset, b.len(), b.as_ptr().cast(), c)
                    }
                    Aio::Zeroes { len, thick } => ffi::rbd_aio_write_zeroes(
                        self.handle,
                        offset,
                        *len,
                        c,
                        if *thick {
                            ffi::RBD_WRITE_ZEROES_FLAG_THICK_PROVISION
                        } else {
                            0
                        },
                        0,
                    ),
                    Aio::Flush => ffi::rbd_aio_flush(self.handle, c),
                }
            };
            if r < 0 {
                // SAFETY: the request was not queued, so the callback will
                // never run: release the completion and reclaim `pending`.
                unsafe { ffi::rbd_aio_release(c) };
            }
            r
        };
        let failed = if submitted < 0 {
            // SAFETY: the callback never ran and never will (see above).
            drop(unsafe { Box::from_raw(pending) });
            Some(io::Error::from_raw_os_error(-submitted))
        } else {
            None
        };
        async move {
            if let Some(e) = failed {
                return Err(e);
            }
            let (r, buf) = rx
                .await
                .map_err(|_| io::Error::other("librbd dropped a completion"))?;
            check_len(r)?;
            Ok(buf.map(BytesMut::freeze))
        }
    }

    pub fn aio_read(
        &self,
        offset: u64,
        len: usize,
    ) -> impl std::future::Future<Output = io::Result<Bytes>> {
        let f = self.submit(Aio::Read(len), offset);
        async move { Ok(f.await?.unwrap_or_default()) }
    }

    pub fn aio_write(
        &self,
        offset: u64,
        data: Bytes,
    ) -> impl std::future::Future<Output = io::Result<()>> {
        let f = self.submit(Aio::Write(data), offset);
        async move { f.await.map(|_| ()) }
    }

    /// Zero a range; `thick` keeps it allocated, otherwise librbd
    /// deallocates whole objects and zeroes the rest (a range always
    /// reads back as zeros, unlike a partial discard).
    pub fn aio_write_zeroes(
        &self,
        offset: u64,
        len: usize,
        thick: bool,
    ) -> impl std::future::Future<Output = io::Result<()>> {
        let f = self.submit(Aio::Zeroes { len, thick }, offset);
        async move { f.await.map(|_| ()) }
    }

    pub fn aio_flush(&self) -> impl std::future::Future<Output = io::Result<()>> {
        let f = self.submit(Aio::Flush, 0);
        async move { f.await.map(|_| ()) }
    }

    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let rest = &mut buf[done..];
            // SAFETY: valid image; `rest` is writable for its length.
            let n = check_len(unsafe {
                ffi::rbd_read(
                    self.handle,
                    offset + done as u64,
                    rest.len(),
                    rest.as_mut_ptr().cast(),
                )
            })?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "{}: read at {} past the image end",
                        self.name,
                        offset + done as u64
                    ),
                ));
            }
            done += n;
        }
        Ok(())
    }

    pub fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let rest = &buf[done..];
            // SAFETY: valid image; `rest` is readable for its length.
            let n = check_len(unsafe {
                ffi::rbd_write(
                    self.handle,
                    offset + done as u64,
                    rest.len(),
                    rest.as_ptr().cast(),
                )
            })?;
            if n == 0 {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            done += n;
        }
        Ok(())
    }

    pub fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let n = (end - at).min(1 << 30) as usize;
            // SAFETY: valid image.
            check_len(unsafe { ffi::rbd_write_zeroes(self.handle, at, n, 0, 0) })?;
            at += n as u64;
        }
        Ok(())
    }

    pub fn flush(&self) -> io::Result<()> {
        // SAFETY: valid image.
        check(unsafe { ffi::rbd_flush(self.handle) })?;
        Ok(())
    }

    /// Extents of `[offset, offset + len)` that differ from snapshot
    /// `from` (`None`: from nothing, i.e. what is allocated), as `(offset,
    /// length, exists)` runs; `exists` false means the range was
    /// deallocated (reads as zeros). With `whole_object`, runs are whole
    /// RBD objects (fast with the object map).
    pub fn diff(
        &self,
        from: Option<&str>,
        offset: u64,
        len: u64,
        whole_object: bool,
    ) -> io::Result<Vec<(u64, u64, bool)>> {
        self.diff_in(from, offset, len, whole_object, true)
    }

    /// [`Image::diff`], counting a clone's parent (`include_parent`) or
    /// only what the clone itself wrote since it was made.
    pub fn diff_in(
        &self,
        from: Option<&str>,
        offset: u64,
        len: u64,
        whole_object: bool,
        include_parent: bool,
    ) -> io::Result<Vec<(u64, u64, bool)>> {
        let from = from.map(cstr).transpose()?;
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        // SAFETY: valid image; `out` outlives the synchronous call that
        // passes it to `on_diff`.
        check(unsafe {
            ffi::rbd_diff_iterate2(
                self.handle,
                from.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
                offset,
                len,
                u8::from(include_parent),
                u8::from(whole_object),
                on_diff,
                (&mut out as *mut Vec<(u64, u64, bool)>).cast(),
            )
        })?;
        out.sort_unstable();
        Ok(out)
    }

    pub fn snap_create(&self, name: &str) -> io::Result<()> {
        let n = cstr(name)?;
        // SAFETY: valid image and name.
        check(unsafe { ffi::rbd_snap_create(self.handle, n.as_ptr()) })?;
        Ok(())
    }

    pub fn snap_remove(&self, name: &str) -> io::Result<()> {
        let n = cstr(name)?;
        // SAFETY: valid image and name.
        check(unsafe { ffi::rbd_snap_remove(self.handle, n.as_ptr()) })?;
        Ok(())
    }

    pub fn snap_rollback(&self, name: &str, mut progress: impl FnMut(u64, u64)) -> io::Result<()> {
        let n = cstr(name)?;
        let mut f: &mut dyn FnMut(u64, u64) = &mut progress;
        // SAFETY: valid image and name; `f` outlives the synchronous call.
        check(unsafe {
            ffi::rbd_snap_rollback_with_progress(
                self.handle,
                n.as_ptr(),
                on_progress,
                (&mut f as *mut &mut dyn FnMut(u64, u64)).cast(),
            )
        })?;
        Ok(())
    }

    pub fn snap_protect(&self, name: &str) -> io::Result<()> {
        let n = cstr(name)?;
        // SAFETY: valid image and name.
        check(unsafe { ffi::rbd_snap_protect(self.handle, n.as_ptr()) })?;
        Ok(())
    }

    pub fn snap_unprotect(&self, name: &str) -> io::Result<()> {
        let n = cstr(name)?;
        // SAFETY: valid image and name.
        check(unsafe { ffi::rbd_snap_unprotect(self.handle, n.as_ptr()) })?;
        Ok(())
    }

    pub fn snap_is_protected(&self, name: &str) -> io::Result<bool> {
        let n = cstr(name)?;
        let mut p: c_int = 0;
        // SAFETY: valid image and name; `p` is an out-pointer.
        check(unsafe { ffi::rbd_snap_is_protected(self.handle, n.as_ptr(), &mut p) })?;
        Ok(p != 0)
    }

    /// Snapshot names of the image.
    pub fn snap_list(&self) -> io::Result<Vec<String>> {
        let mut cap: c_int = 16;
        loop {
            let mut v: Vec<ffi::rbd_snap_info_t> = (0..cap)
                .map(|_| ffi::rbd_snap_info_t {
                    id: 0,
                    size: 0,
                    name: std::ptr::null(),
                })
                .collect();
            let mut max = cap;
            // SAFETY: `v` has room for `max` entries (librbd uses one more
            // slot as a terminator within `max`).
            let r = unsafe { ffi::rbd_snap_list(self.handle, v.as_mut_ptr(), &mut max) };
            if r == -libc::ERANGE {
                cap = max.max(cap * 2) + 1;
                continue;
            }
            let n = check(r)? as usize;
            let names = v[..n]
                .iter()
                .map(|s| {
                    // SAFETY: librbd set `name` of the first `n` entries to
                    // NUL-terminated strings it allocated.
                    unsafe { CStr::from_ptr(s.name) }
                        .to_string_lossy()
                        .into_owned()
                })
                .collect();
            // SAFETY: frees the names librbd allocated in `v`.
            unsafe { ffi::rbd_snap_list_end(v.as_mut_ptr()) };
            return Ok(names);
        }
    }

    /// Copy every block the image reads from its parent into it and cut
    /// the link; `progress(done, total)`.
    pub fn flatten(&self, mut progress: impl FnMut(u64, u64)) -> io::Result<()> {
        let mut f: &mut dyn FnMut(u64, u64) = &mut progress;
        // SAFETY: valid image; `f` outlives the synchronous call.
        check(unsafe {
            ffi::rbd_flatten_with_progress(
                self.handle,
                on_progress,
                (&mut f as *mut &mut dyn FnMut(u64, u64)).cast(),
            )
        })?;
        Ok(())
    }

    pub fn metadata_get(&self, key: &str) -> io::Result<Option<String>> {
        let k = cstr(key)?;
        let mut cap = 4096usize;
        loop {
            let mut buf = vec![0u8; cap];
            let mut len = cap;
            // SAFETY: valid image and key; `buf` has room for `len` bytes.
            let r = unsafe {
                ffi::rbd_metadata_get(self.handle, k.as_ptr(), buf.as_mut_ptr().cast(), &mut len)
            };
            if r == -libc::ENOENT {
                return Ok(None);
            }
            if r == -libc::ERANGE {
                cap = len.max(cap * 2);
                continue;
            }
            check(r)?;
            let end = buf[..len.min(cap)]
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(len.min(cap));
            buf.truncate(end);
            return String::from_utf8(buf).map(Some).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: metadata {key} is not UTF-8", self.name),
                )
            });
        }
    }

    /// Set one metadata key: one omap update of the image header, atomic.
    pub fn metadata_set(&self, key: &str, value: &str) -> io::Result<()> {
        let (k, v) = (cstr(key)?, cstr(value)?);
        // SAFETY: valid image and strings.
        check(unsafe { ffi::rbd_metadata_set(self.handle, k.as_ptr(), v.as_ptr()) })?;
        Ok(())
    }

    pub fn metadata_remove(&self, key: &str) -> io::Result<()> {
        let k = cstr(key)?;
        // SAFETY: valid image and key.
        let r = unsafe { ffi::rbd_metadata_remove(self.handle, k.as_ptr()) };
        if r == -libc::ENOENT {
            return Ok(());
        }
        check(r)?;
        Ok(())
    }

    /// Take the image's exclusive lock and keep it (librbd does not hand
    /// it to a peer that asks: other clients' writes fail until it is
    /// released or broken).
    pub fn lock_acquire(&self) -> io::Result<()> {
        // SAFETY: valid image.
        check(unsafe { ffi::rbd_lock_acquire(self.handle, ffi::RBD_LOCK_MODE_EXCLUSIVE) })?;
        Ok(())
    }

    pub fn lock_release(&self) -> io::Result<()> {
        // SAFETY: valid image.
        check(unsafe { ffi::rbd_lock_release(self.handle) })?;
        Ok(())
    }

    pub fn is_lock_owner(&self) -> io::Result<bool> {
        let mut o: c_int = 0;
        // SAFETY: valid image; `o` is an out-pointer.
        check(unsafe { ffi::rbd_is_exclusive_lock_owner(self.handle, &mut o) })?;
        Ok(o != 0)
    }

    /// Who holds the exclusive lock (librbd's owner strings), if anyone.
    pub fn lock_owners(&self) -> io::Result<Vec<String>> {
        let mut mode: c_int = 0;
        let mut owners: [*mut c_char; 8] = [std::ptr::null_mut(); 8];
        let mut n = owners.len();
        // SAFETY: valid image; `owners` has room for `n` pointers.
        let r = unsafe {
            ffi::rbd_lock_get_owners(self.handle, &mut mode, owners.as_mut_ptr(), &mut n)
        };
        if r == -libc::ENOENT {
            return Ok(vec![]);
        }
        check(r)?;
        let v = owners[..n]
            .iter()
            // SAFETY: librbd set the first `n` pointers to C strings.
            .map(|&p| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
            .collect();
        // SAFETY: frees exactly the `n` strings librbd allocated.
        unsafe { ffi::rbd_lock_get_owners_cleanup(owners.as_mut_ptr(), n) };
        Ok(v)
    }

    /// Break `owner`'s exclusive lock. librbd blocklists the owner's client
    /// at the OSDs first (`rbd_blocklist_on_break_lock`), so a partitioned
    /// old owner's later writes fail with ESHUTDOWN: this is the fence.
    pub fn lock_break(&self, owner: &str) -> io::Result<()> {
        let o = cstr(owner)?;
        // SAFETY: valid image and owner string.
        check(unsafe {
            ffi::rbd_lock_break(self.handle, ffi::RBD_LOCK_MODE_EXCLUSIVE, o.as_ptr())
        })?;
        Ok(())
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: the last reference; closing waits for in-flight AIO, whose
        // callbacks own their buffers.
        unsafe { ffi::rbd_close(self.handle) };
    }
}

// ----- the image as a store object -------------------------------------------

/// An RBD LUN as a store [`Object`]: guest I/O on librbd's asynchronous
/// API, metadata and tools on its synchronous one.
///
/// Two images: the LUN image (`NAME.lun`, the *anchor*: its name, its
/// metadata and its ownership lock are what the pool, the coordinator and
/// fencing know) and the image holding the live bytes, the anchor itself
/// until a revert swaps in a clone of the snapshot (`rbd/tree.rs`). Clones
/// of this value share the live slot, so a swap reaches every holder; it
/// is made while the volume's I/O lock is held, with no request in flight.
#[derive(Debug, Clone)]
pub struct RbdObject {
    anchor: Arc<Image>,
    live: Arc<std::sync::RwLock<Arc<Image>>>,
    name: PathBuf,
}

impl RbdObject {
    pub fn new(image: Arc<Image>, name: PathBuf) -> RbdObject {
        RbdObject::with_live(image.clone(), image, name)
    }
    /// A LUN whose live bytes are in `live` (a revert clone), not `anchor`.
    pub fn with_live(anchor: Arc<Image>, live: Arc<Image>, name: PathBuf) -> RbdObject {
        RbdObject {
            anchor,
            live: Arc::new(std::sync::RwLock::new(live)),
            name,
        }
    }
    /// The LUN image (the anchor): its metadata, its ownership lock.
    pub fn image(&self) -> &Arc<Image> {
        &self.anchor
    }
    /// The image the LUN's bytes are in now.
    pub fn data(&self) -> Arc<Image> {
        self.live.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
    /// Make `img` the image of the live bytes; returns the previous one.
    /// The caller holds the volume's I/O lock (no request in flight).
    pub fn swap_data(&self, img: Arc<Image>) -> Arc<Image> {
        std::mem::replace(
            &mut *self.live.write().unwrap_or_else(|e| e.into_inner()),
            img,
        )
    }
}

impl BlockDevice for RbdObject {
    fn size(&self) -> u64 {
        self.data().size().unwrap_or(0)
    }

    fn caps(&self) -> Caps {
        Caps {
            writable: self.data().writable,
            flush: true,
            trim: true,
            fast_zero: true,
            extents: true,
        }
    }

    fn read(&self, offset: u64, len: usize) -> IoFuture<Bytes> {
        Box::pin(self.data().aio_read(offset, len))
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> IoFuture<()> {
        let w = self.data().aio_write(offset, data);
        let img = self.data().clone();
        Box::pin(async move {
            w.await?;
            if fua {
                img.aio_flush().await?;
            }
            Ok(())
        })
    }

    fn flush(&self) -> IoFuture<()> {
        Box::pin(self.data().aio_flush())
    }

    fn trim(&self, offset: u64, len: u64) -> IoFuture<()> {
        self.write_zeroes(offset, len, true)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> IoFuture<()> {
        let Ok(n) = usize::try_from(len) else {
            return done(Err(io::Error::from_raw_os_error(libc::EINVAL)));
        };
        Box::pin(self.data().aio_write_zeroes(offset, n, !may_trim))
    }

    fn extents(&self, offset: u64, len: u64) -> IoFuture<Vec<Extent>> {
        done(
            super::Object::data_extents(self, offset, offset + len).map(|data| {
                let mut out = Vec::new();
                let mut at = offset;
                for (o, l) in data {
                    if o > at {
                        out.push(Extent {
                            offset: at,
                            length: o - at,
                            data: false,
                        });
                    }
                    out.push(Extent {
                        offset: o,
                        length: l,
                        data: true,
                    });
                    at = o + l;
                }
                if at < offset + len {
                    out.push(Extent {
                        offset: at,
                        length: offset + len - at,
                        data: false,
                    });
                }
                out
            }),
        )
    }

    fn cache(&self, _offset: u64, _len: u64) -> IoFuture<()> {
        done(Ok(()))
    }
}

impl super::Object for RbdObject {
    fn name(&self) -> &Path {
        &self.name
    }
    fn rbd_object(&self) -> Option<&RbdObject> {
        Some(self)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.data().read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.data().write_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        self.data().flush()
    }
    fn byte_len(&self) -> io::Result<u64> {
        self.data().size()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.data().resize(len)
    }
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.data().write_zeroes(offset, len)
    }
    fn data_extents(&self, start: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
        if end <= start {
            return Ok(vec![]);
        }
        // Whole objects, from the object map: conservative (an allocated
        // object may hold zeros) and cheap.
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (o, l, exists) in self.data().diff(None, start, end - start, true)? {
            if !exists {
                continue;
            }
            let (s, e) = (o.max(start), (o + l).min(end));
            if s >= e {
                continue;
            }
            match out.last_mut() {
                Some(last) if last.0 + last.1 >= s => last.1 = last.1.max(e - last.0),
                _ => out.push((s, e - s)),
            }
        }
        Ok(out)
    }
    fn stored_bytes(&self) -> u64 {
        let size = self.data().size().unwrap_or(0);
        self.data_extents(0, size)
            .map(|v| v.iter().map(|(_, l)| l).sum())
            .unwrap_or(0)
    }
    fn will_need(&self, _offset: u64, _len: u64) {}
    fn is_block_device(&self) -> bool {
        false
    }
}
