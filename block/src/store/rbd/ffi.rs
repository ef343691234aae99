//! The C interface of librados and librbd that lungate uses, declared by
//! hand from `rados/librados.h` and `rbd/librbd.h` (Ceph 16, Pacific) and
//! linked by `block/build.rs` only with the `rbd` feature.
//!
//! Nothing here is called from outside `store::rbd`, whose safe wrappers
//! ([`super::Cluster`], [`super::Pool`], [`super::Image`]) are the one
//! place these functions are called. Every function returns 0 (or a
//! length) on success and a negative errno on failure unless noted.

#![allow(non_camel_case_types)]

use std::os::raw::{c_char, c_int, c_void};

pub type rados_t = *mut c_void;
pub type rados_ioctx_t = *mut c_void;
pub type rbd_image_t = *mut c_void;
pub type rbd_image_options_t = *mut c_void;
pub type rbd_completion_t = *mut c_void;

/// `rbd_callback_t`: called once, on a librbd thread, when an AIO completes.
pub type rbd_callback_t = extern "C" fn(cb: rbd_completion_t, arg: *mut c_void);
/// `librbd_progress_fn_t`: a non-zero return cancels the operation.
pub type rbd_progress_fn_t = extern "C" fn(offset: u64, total: u64, arg: *mut c_void) -> c_int;
/// `rbd_diff_iterate2`'s callback: `(offset, length, exists, arg)`.
pub type rbd_diff_cb_t =
    extern "C" fn(off: u64, len: usize, exists: c_int, arg: *mut c_void) -> c_int;

/// `rbd_snap_info_t`.
#[repr(C)]
pub struct rbd_snap_info_t {
    pub id: u64,
    pub size: u64,
    pub name: *const c_char,
}

/// `rbd_image_spec_t`.
#[repr(C)]
pub struct rbd_image_spec_t {
    pub id: *mut c_char,
    pub name: *mut c_char,
}

pub const RBD_LOCK_MODE_EXCLUSIVE: c_int = 0;
pub const RBD_IMAGE_OPTION_FEATURES: c_int = 1;
pub const RBD_IMAGE_OPTION_ORDER: c_int = 2;
pub const RBD_FEATURE_LAYERING: u64 = 1 << 0;
pub const RBD_FEATURE_EXCLUSIVE_LOCK: u64 = 1 << 2;
pub const RBD_FEATURE_OBJECT_MAP: u64 = 1 << 3;
pub const RBD_FEATURE_FAST_DIFF: u64 = 1 << 4;
pub const RBD_FEATURE_DEEP_FLATTEN: u64 = 1 << 5;
/// `rbd_write_zeroes` flag: keep the zeroed extent allocated.
pub const RBD_WRITE_ZEROES_FLAG_THICK_PROVISION: c_int = 1;

extern "C" {
    // ----- librados: the cluster connection and pool contexts ----------
    pub fn rados_create(cluster: *mut rados_t, id: *const c_char) -> c_int;
    pub fn rados_conf_read_file(cluster: rados_t, path: *const c_char) -> c_int;
    pub fn rados_conf_parse_env(cluster: rados_t, var: *const c_char) -> c_int;
    pub fn rados_conf_set(cluster: rados_t, option: *const c_char, value: *const c_char) -> c_int;
    pub fn rados_connect(cluster: rados_t) -> c_int;
    pub fn rados_shutdown(cluster: rados_t);
    pub fn rados_ioctx_create(
        cluster: rados_t,
        pool: *const c_char,
        io: *mut rados_ioctx_t,
    ) -> c_int;
    pub fn rados_ioctx_destroy(io: rados_ioctx_t);
    pub fn rados_ioctx_set_namespace(io: rados_ioctx_t, nspace: *const c_char);
    pub fn rados_write_full(
        io: rados_ioctx_t,
        oid: *const c_char,
        buf: *const c_char,
        len: usize,
    ) -> c_int;
    pub fn rados_read(
        io: rados_ioctx_t,
        oid: *const c_char,
        buf: *mut c_char,
        len: usize,
        off: u64,
    ) -> c_int;

    // ----- librbd: pools and images --------------------------------------
    pub fn rbd_pool_init(io: rados_ioctx_t, force: bool) -> c_int;
    pub fn rbd_namespace_create(io: rados_ioctx_t, name: *const c_char) -> c_int;
    pub fn rbd_namespace_exists(io: rados_ioctx_t, name: *const c_char, exists: *mut bool)
        -> c_int;
    pub fn rbd_list2(io: rados_ioctx_t, images: *mut rbd_image_spec_t, max: *mut usize) -> c_int;
    pub fn rbd_image_spec_list_cleanup(images: *mut rbd_image_spec_t, n: usize);
    pub fn rbd_image_options_create(opts: *mut rbd_image_options_t);
    pub fn rbd_image_options_destroy(opts: rbd_image_options_t);
    pub fn rbd_image_options_set_uint64(
        opts: rbd_image_options_t,
        optname: c_int,
        value: u64,
    ) -> c_int;
    pub fn rbd_create4(
        io: rados_ioctx_t,
        name: *const c_char,
        size: u64,
        opts: rbd_image_options_t,
    ) -> c_int;
    pub fn rbd_clone3(
        p_io: rados_ioctx_t,
        p_name: *const c_char,
        p_snap: *const c_char,
        c_io: rados_ioctx_t,
        c_name: *const c_char,
        opts: rbd_image_options_t,
    ) -> c_int;
    pub fn rbd_remove(io: rados_ioctx_t, name: *const c_char) -> c_int;
    pub fn rbd_rename(io: rados_ioctx_t, src: *const c_char, dst: *const c_char) -> c_int;
    pub fn rbd_open(
        io: rados_ioctx_t,
        name: *const c_char,
        image: *mut rbd_image_t,
        snap: *const c_char,
    ) -> c_int;
    pub fn rbd_open_read_only(
        io: rados_ioctx_t,
        name: *const c_char,
        image: *mut rbd_image_t,
        snap: *const c_char,
    ) -> c_int;
    pub fn rbd_close(image: rbd_image_t) -> c_int;
    pub fn rbd_get_size(image: rbd_image_t, size: *mut u64) -> c_int;
    pub fn rbd_resize(image: rbd_image_t, size: u64) -> c_int;

    // ----- synchronous I/O (metadata, tools) -----------------------------
    pub fn rbd_read(image: rbd_image_t, ofs: u64, len: usize, buf: *mut c_char) -> isize;
    pub fn rbd_write(image: rbd_image_t, ofs: u64, len: usize, buf: *const c_char) -> isize;
    pub fn rbd_write_zeroes(
        image: rbd_image_t,
        ofs: u64,
        len: usize,
        zero_flags: c_int,
        op_flags: c_int,
    ) -> isize;
    pub fn rbd_flush(image: rbd_image_t) -> c_int;
    pub fn rbd_diff_iterate2(
        image: rbd_image_t,
        fromsnap: *const c_char,
        ofs: u64,
        len: u64,
        include_parent: u8,
        whole_object: u8,
        cb: rbd_diff_cb_t,
        arg: *mut c_void,
    ) -> c_int;

    // ----- asynchronous I/O (the guest data path) ------------------------
    pub fn rbd_aio_create_completion(
        arg: *mut c_void,
        cb: rbd_callback_t,
        c: *mut rbd_completion_t,
    ) -> c_int;
    pub fn rbd_aio_get_return_value(c: rbd_completion_t) -> isize;
    pub fn rbd_aio_release(c: rbd_completion_t);
    pub fn rbd_aio_read(
        image: rbd_image_t,
        off: u64,
        len: usize,
        buf: *mut c_char,
        c: rbd_completion_t,
    ) -> c_int;
    pub fn rbd_aio_write(
        image: rbd_image_t,
        off: u64,
        len: usize,
        buf: *const c_char,
        c: rbd_completion_t,
    ) -> c_int;
    pub fn rbd_aio_write_zeroes(
        image: rbd_image_t,
        off: u64,
        len: usize,
        c: rbd_completion_t,
        zero_flags: c_int,
        op_flags: c_int,
    ) -> c_int;
    pub fn rbd_aio_flush(image: rbd_image_t, c: rbd_completion_t) -> c_int;

    // ----- snapshots and clones ------------------------------------------
    pub fn rbd_snap_create(image: rbd_image_t, name: *const c_char) -> c_int;
    pub fn rbd_snap_remove(image: rbd_image_t, name: *const c_char) -> c_int;
    pub fn rbd_snap_rollback_with_progress(
        image: rbd_image_t,
        name: *const c_char,
        cb: rbd_progress_fn_t,
        arg: *mut c_void,
    ) -> c_int;
    pub fn rbd_snap_protect(image: rbd_image_t, name: *const c_char) -> c_int;
    pub fn rbd_snap_unprotect(image: rbd_image_t, name: *const c_char) -> c_int;
    pub fn rbd_snap_is_protected(
        image: rbd_image_t,
        name: *const c_char,
        protected: *mut c_int,
    ) -> c_int;
    pub fn rbd_snap_list(image: rbd_image_t, snaps: *mut rbd_snap_info_t, max: *mut c_int)
        -> c_int;
    pub fn rbd_snap_list_end(snaps: *mut rbd_snap_info_t);
    pub fn rbd_flatten_with_progress(
        image: rbd_image_t,
        cb: rbd_progress_fn_t,
        arg: *mut c_void,
    ) -> c_int;

    // ----- image metadata (the manifest) ---------------------------------
    pub fn rbd_metadata_get(
        image: rbd_image_t,
        key: *const c_char,
        value: *mut c_char,
        len: *mut usize,
    ) -> c_int;
    pub fn rbd_metadata_set(image: rbd_image_t, key: *const c_char, value: *const c_char) -> c_int;
    pub fn rbd_metadata_remove(image: rbd_image_t, key: *const c_char) -> c_int;

    // ----- the exclusive lock (ownership fencing) ------------------------
    pub fn rbd_lock_acquire(image: rbd_image_t, mode: c_int) -> c_int;
    pub fn rbd_lock_release(image: rbd_image_t) -> c_int;
    pub fn rbd_lock_get_owners(
        image: rbd_image_t,
        mode: *mut c_int,
        owners: *mut *mut c_char,
        max: *mut usize,
    ) -> c_int;
    pub fn rbd_lock_get_owners_cleanup(owners: *mut *mut c_char, n: usize);
    pub fn rbd_lock_break(image: rbd_image_t, mode: c_int, owner: *const c_char) -> c_int;
    pub fn rbd_is_exclusive_lock_owner(image: rbd_image_t, is_owner: *mut c_int) -> c_int;
}
