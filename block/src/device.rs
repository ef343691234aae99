//! The one block-device interface of the data path.
//!
//! Every layer of an export's stack implements [`BlockDevice`] and wraps the
//! one below it: the region view (offset or truncate) → the live-switch
//! gate (holding queue) → the volume (copy-on-write chain) → the store's
//! objects (io_uring files today). A request walks down the stack without
//! knowing what is below, in the spirit of nbdkit's `nbdkit_next_ops`.
//!
//! Contract, for every implementation:
//! * offsets and lengths are bytes of *this* device; the top of the stack
//!   checks them against [`BlockDevice::size`] once, with checked
//!   arithmetic, and the layers below only translate (a request that
//!   reaches a lower layer is in range by construction);
//! * a method does its synchronous part when it is *called* and returns a
//!   `'static` future for the rest, so a caller that calls in arrival
//!   order gets arrival order where a layer cares (the gate takes its
//!   place in the holding queue at call time);
//! * errors are `io::Error`s whose kind and OS error code survive from the
//!   layer that failed (a layer's own error rides inside as the source,
//!   never flattened to a string), so the wire layer can map them to
//!   protocol errors.

use std::future::Future;
use std::io;
use std::ops::Range;
use std::pin::Pin;

use bytes::Bytes;

/// A run of bytes that is either all data or all hole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    /// `false`: a hole, which reads as zeros.
    pub data: bool,
}

/// The future every [`BlockDevice`] method returns.
pub type IoFuture<T> = Pin<Box<dyn Future<Output = io::Result<T>> + Send + 'static>>;

/// A future that is already complete.
pub fn done<T: Send + 'static>(r: io::Result<T>) -> IoFuture<T> {
    Box::pin(std::future::ready(r))
}

/// What a device can do beyond reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Caps {
    pub writable: bool,
    /// FLUSH makes acknowledged writes durable (and FUA is honoured).
    pub flush: bool,
    /// TRIM deallocates.
    pub trim: bool,
    /// WRITE_ZEROES without writing every byte when trimming is allowed.
    pub fast_zero: bool,
    /// Extents tell data from holes (otherwise everything is data).
    pub extents: bool,
}

/// One piece of a [`BlockDevice::read_chunks`] answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    Data {
        offset: u64,
        data: Bytes,
    },
    /// Reads as zeros; no bytes were read for it.
    Hole {
        offset: u64,
        length: u64,
    },
}

impl Chunk {
    pub fn offset(&self) -> u64 {
        match self {
            Chunk::Data { offset, .. } | Chunk::Hole { offset, .. } => *offset,
        }
    }
    pub fn len(&self) -> u64 {
        match self {
            Chunk::Data { data, .. } => data.len() as u64,
            Chunk::Hole { length, .. } => *length,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A block device: a fixed-size byte range with asynchronous I/O.
pub trait BlockDevice: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;

    fn caps(&self) -> Caps;

    /// Read exactly `len` bytes at `offset`.
    fn read(&self, offset: u64, len: usize) -> IoFuture<Bytes>;

    /// Read `[offset, offset + len)` as consecutive chunks covering it
    /// exactly, where a layer that knows a range reads as zeros may say so
    /// instead of reading it. One consistent view: the same state a single
    /// [`BlockDevice::read`] would see.
    fn read_chunks(&self, offset: u64, len: usize) -> IoFuture<Vec<Chunk>> {
        let r = self.read(offset, len);
        Box::pin(async move {
            let data = r.await?;
            Ok(vec![Chunk::Data { offset, data }])
        })
    }

    /// Write `data` at `offset`; with `fua`, durable before the future
    /// completes.
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> IoFuture<()>;

    /// Every write acknowledged before this call is durable when the
    /// future completes.
    fn flush(&self) -> IoFuture<()>;

    /// Deallocate; the range reads back as zeros.
    fn trim(&self, offset: u64, len: u64) -> IoFuture<()>;

    /// Make the range read as zeros; `may_trim` allows deallocating it.
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> IoFuture<()>;

    /// Data and hole runs covering exactly `[offset, offset + len)`. A hole
    /// always reads as zeros; zeros may also be reported as data.
    fn extents(&self, offset: u64, len: u64) -> IoFuture<Vec<Extent>>;

    /// Advise that `[offset, offset + len)` will be read soon (NBD_CMD_CACHE):
    /// the layer that holds each byte is asked to bring it in.
    fn cache(&self, offset: u64, len: u64) -> IoFuture<()>;

    /// The bytes of `[offset, offset + len)` written, trimmed or zeroed
    /// since snapshot `snapshot` was taken (NBD's `qemu:dirty-bitmap`
    /// contexts): ascending, merged, clipped to the range, at the
    /// granularity of the layer that keeps snapshots (the volume's
    /// cluster). A layer that only translates maps the ranges; a device
    /// that keeps no snapshots refuses with `Unsupported`, an unknown
    /// snapshot is `NotFound`.
    fn changed_since(&self, snapshot: &str, offset: u64, len: u64) -> IoFuture<Vec<Range<u64>>> {
        let _ = (offset, len);
        done(Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("this device keeps no snapshots (asked for changes since {snapshot:?})"),
        )))
    }
}

/// `[offset, offset + len)` inside `size`, with checked arithmetic: the one
/// bounds check a stack's top layer makes.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<(), RangeError> {
    match offset.checked_add(len) {
        None => Err(RangeError::Overflow {
            offset,
            length: len,
        }),
        Some(end) if end > size => Err(RangeError::OutOfBounds {
            offset,
            length: len,
            size,
        }),
        Some(_) => Ok(()),
    }
}

/// Why a request range was refused by the top of a stack.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error("offset {offset} + length {length} overflows 64 bits")]
    Overflow { offset: u64, length: u64 },
    #[error("offset {offset} + length {length} exceeds the device size {size}")]
    OutOfBounds { offset: u64, length: u64, size: u64 },
}

impl From<RangeError> for io::Error {
    fn from(e: RangeError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidInput, e)
    }
}

/// The [`RangeError`] inside an `io::Error`, if that is what it carries.
pub fn range_error(e: &io::Error) -> Option<&RangeError> {
    e.get_ref().and_then(|s| s.downcast_ref::<RangeError>())
}
