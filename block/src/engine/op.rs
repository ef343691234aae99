//! What both engines share: the request an engine executes, the plan for
//! making a range read as zeros, and the engine's error type. Nothing here
//! performs I/O.

use std::fs::File;
use std::io;
use std::sync::Arc;

use bytes::Bytes;
use thiserror::Error;
use tokio::sync::oneshot;

/// Largest byte count handed to the kernel in one read or write; anything
/// longer continues like a short transfer. Keeps lengths inside `u32` (the
/// io_uring SQE field) and below the kernel's own per-call cap.
pub(crate) const MAX_TRANSFER: usize = 1 << 30;

/// Chunk size for writing zeros when the file or device refuses fallocate.
pub(crate) const ZERO_CHUNK: usize = 1 << 20;

/// Source buffer for zero writes. Being `static` and never mutated it
/// outlives every in-flight operation, so the kernel may read it at any time.
pub(crate) static ZEROS: [u8; ZERO_CHUNK] = [0; ZERO_CHUNK];

/// How an engine makes `[offset, offset+len)` read back as zeros: try each
/// fallocate mode in order, moving on when the file says it cannot (see
/// [`fallocate_unsupported`]), then write zeros from [`ZEROS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ZeroPlan {
    /// Deallocate where possible: punch a hole, else zero the range in
    /// place, else write zeros.
    Trim,
    /// Keep the range allocated: zero it in place, else write zeros.
    NoTrim,
    /// Only write zeros. Used by tests to exercise the fallback on
    /// filesystems that do support fallocate.
    #[cfg(test)]
    WriteOnly,
}

const PUNCH: libc::c_int = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
const ZERO_RANGE: libc::c_int = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;

impl ZeroPlan {
    /// The fallocate modes to try, in order, before writing zeros. On a
    /// block device the kernel maps PUNCH to a zeroing discard and
    /// ZERO_RANGE to a write-zeroes command, so the same plan serves both.
    pub(crate) fn modes(self) -> &'static [libc::c_int] {
        match self {
            ZeroPlan::Trim => &[PUNCH, ZERO_RANGE],
            ZeroPlan::NoTrim => &[ZERO_RANGE],
            #[cfg(test)]
            ZeroPlan::WriteOnly => &[],
        }
    }
}

/// True when a fallocate error means "this file cannot do that mode" rather
/// than a real failure, so the next step of a [`ZeroPlan`] should run.
/// EINVAL covers unaligned ranges on block devices and kernels whose
/// io_uring predates IORING_OP_FALLOCATE.
pub(crate) fn fallocate_unsupported(errno: i32) -> bool {
    matches!(
        errno,
        libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS | libc::ENODEV
    )
}

/// True for errors that mean "try the same call again".
pub(crate) fn retryable(errno: i32) -> bool {
    errno == libc::EINTR || errno == libc::EAGAIN
}

/// One operation, with the buffer it reads into or writes from.
pub(crate) enum Op {
    /// Read `len` bytes into `buf` (capacity `len`). `buf` may already hold
    /// a prefix read elsewhere; the read continues after it.
    Read { buf: Vec<u8>, len: usize },
    /// Write all of `data`; with `fua` it is durable before completion.
    Write { data: Bytes, fua: bool },
    /// fdatasync.
    Flush,
    /// Make `len` bytes read as zeros following `plan`.
    Zero { len: u64, plan: ZeroPlan },
}

/// Where the result goes: the read data, or an empty `Bytes` for the rest.
pub(crate) type Reply = oneshot::Sender<io::Result<Bytes>>;

/// An operation on one file at one offset, and where to send its result.
pub(crate) struct Request {
    pub(crate) file: Arc<File>,
    pub(crate) offset: u64,
    pub(crate) op: Op,
    pub(crate) reply: Reply,
}

impl Request {
    /// Deliver the result. The caller may have stopped waiting (its future
    /// was dropped); the operation has still run, which is all we owe it.
    pub(crate) fn finish(self, result: io::Result<Bytes>) {
        let _ = self.reply.send(result);
    }
}

/// Errors the engine itself produces. OS errors are passed through as
/// `io::Error::from_raw_os_error` so callers can map errno values (ENOSPC,
/// EIO, ...) to protocol error codes.
#[derive(Debug, Error)]
pub enum BackendError {
    #[error("read of {len} bytes at offset {offset}: end of file after {done} bytes")]
    ShortRead { offset: u64, len: u64, done: u64 },
    #[error("write of {len} bytes at offset {offset}: kernel accepted nothing after {done} bytes")]
    WriteZero { offset: u64, len: u64, done: u64 },
    #[error(
        "offset {offset} + length {len} exceeds the largest file offset {}",
        i64::MAX
    )]
    Range { offset: u64, len: u64 },
    #[error("cannot allocate a {len}-byte read buffer")]
    NoMemory { len: usize },
    #[error("{engine} I/O engine stopped before the request completed")]
    Stopped { engine: &'static str },
    #[error("io_uring unavailable: {why}")]
    Unavailable { why: String },
    #[error("unknown I/O engine {value:?}: expected auto, uring (or io_uring) or sync")]
    UnknownEngine { value: String },
}

impl From<BackendError> for io::Error {
    fn from(e: BackendError) -> io::Error {
        let kind = match &e {
            BackendError::ShortRead { .. } => io::ErrorKind::UnexpectedEof,
            BackendError::WriteZero { .. } => io::ErrorKind::WriteZero,
            BackendError::Range { .. } | BackendError::UnknownEngine { .. } => {
                io::ErrorKind::InvalidInput
            }
            BackendError::NoMemory { .. } => io::ErrorKind::OutOfMemory,
            BackendError::Stopped { .. } => io::ErrorKind::BrokenPipe,
            BackendError::Unavailable { .. } => io::ErrorKind::Unsupported,
        };
        io::Error::new(kind, e)
    }
}

/// Reject ranges whose end does not fit in `off_t`: the kernel would refuse
/// them with a bare EINVAL that names nothing.
pub(crate) fn check_range(offset: u64, len: u64) -> io::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= i64::MAX as u64 => Ok(()),
        _ => Err(BackendError::Range { offset, len }.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_check_rejects_ends_past_off_t() {
        assert!(check_range(0, i64::MAX as u64).is_ok());
        assert!(check_range(1, i64::MAX as u64).is_err());
        let e = check_range(u64::MAX, 2).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains(&u64::MAX.to_string()), "{e}");
    }

    #[test]
    fn trim_plan_punches_before_zeroing_and_no_trim_never_punches() {
        assert_eq!(ZeroPlan::Trim.modes(), &[PUNCH, ZERO_RANGE]);
        assert!(ZeroPlan::NoTrim
            .modes()
            .iter()
            .all(|m| m & libc::FALLOC_FL_PUNCH_HOLE == 0));
    }
}
