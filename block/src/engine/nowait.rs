//! Opportunistic reads on the caller's thread: `preadv2(RWF_NOWAIT)`
//! returns data only if it is already in the page cache and never waits
//! for the device. A hit costs one system call instead of two thread
//! handoffs; a miss (EAGAIN, or a partial hit) hands the rest of the read to
//! the engine, which continues from where this stopped.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;

use super::op::{retryable, BackendError};

/// Largest read tried inline: bigger copies would hold up the caller's
/// executor thread for longer than a handoff costs.
pub(crate) const INLINE_READ_MAX: usize = 64 << 10;

pub(crate) enum Outcome {
    /// `buf` holds all `len` bytes.
    Complete,
    /// `buf` holds a prefix (possibly empty); the rest needs the engine.
    WouldBlock,
    /// The kernel or file does not support RWF_NOWAIT reads.
    Unsupported,
}

/// Read as much of `[offset, offset+len)` into `buf` (empty, capacity at
/// least `len`) as the page cache holds.
pub(crate) fn read(file: &File, offset: u64, buf: &mut Vec<u8>, len: usize) -> io::Result<Outcome> {
    debug_assert!(buf.is_empty() && buf.capacity() >= len);
    while buf.len() < len {
        let done = buf.len();
        let at = offset + done as u64;
        let iov = libc::iovec {
            // SAFETY: pointer arithmetic inside the allocation: `done < len <= capacity`.
            iov_base: unsafe { buf.as_mut_ptr().add(done) }.cast(),
            iov_len: len - done,
        };
        // SAFETY: the iovec points at the vector's spare capacity, which is
        // ours to write and at least `len - done` bytes long; the call
        // returns before we touch `buf` again. Position is passed as
        // (low, high) words as the syscall ABI wants; on 64-bit targets the
        // kernel takes the whole offset from the low word.
        let r = unsafe {
            libc::syscall(
                libc::SYS_preadv2,
                file.as_raw_fd(),
                &iov as *const libc::iovec,
                1 as libc::c_int,
                at as libc::c_ulong,
                (at >> 32) as libc::c_ulong,
                libc::RWF_NOWAIT,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) => Ok(Outcome::WouldBlock),
                Some(errno) if retryable(errno) => continue,
                Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL) => Ok(Outcome::Unsupported),
                _ => Err(e),
            };
        }
        if r == 0 {
            return Err(BackendError::ShortRead {
                offset,
                len: len as u64,
                done: done as u64,
            }
            .into());
        }
        // SAFETY: the kernel initialised `r` more bytes after the first
        // `done`, and `done + r <= len <= capacity`.
        unsafe { buf.set_len(done + r as usize) };
    }
    Ok(Outcome::Complete)
}
