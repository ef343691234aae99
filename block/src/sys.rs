//! The one place for the system calls the data path and provisioning make
//! on files, each wrapped once: size, lseek data/hole (extents), fadvise,
//! fallocate, flock, gethostname, fstatvfs; and the whole-range operations built on
//! them (sparse copy, zeroing). Per-request guest I/O goes through
//! [`crate::engine`] instead.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::io::AsRawFd;

use crate::device::Extent;

/// Size of a regular file or block device.
pub fn backing_size(file: &File) -> io::Result<u64> {
    let md = file.metadata()?;
    if md.file_type().is_block_device() {
        let mut f = file;
        f.seek(SeekFrom::End(0))
    } else {
        Ok(md.len())
    }
}

pub fn is_block_device(file: &File) -> io::Result<bool> {
    Ok(file.metadata()?.file_type().is_block_device())
}

/// `lseek`; `Ok(None)` for ENXIO (no data, or no hole, at or after `off`).
fn lseek(file: &File, off: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let off = off_t(off)?;
    // SAFETY: lseek on a valid, owned descriptor has no memory effects.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}

/// Data and hole runs covering exactly `[offset, offset+len)`, in order,
/// adjacent runs of the same kind merged, from `lseek(SEEK_DATA /
/// SEEK_HOLE)`. Bytes past end of file are a hole. Advisory (a hole may be
/// filled a moment later) and conservative: where the filesystem cannot
/// tell, everything is data.
///
/// Uses the descriptor's file position (lseek moves it); all other I/O here
/// is positional, so that is harmless.
pub fn extents(file: &File, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
    let end = offset.checked_add(len).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("offset {offset} + length {len} overflows"),
        )
    })?;
    let mut out: Vec<Extent> = Vec::new();
    let mut push = |start: u64, stop: u64, data: bool| {
        if stop <= start {
            return;
        }
        match out.last_mut() {
            Some(last) if last.data == data && last.offset + last.length == start => {
                last.length += stop - start;
            }
            _ => out.push(Extent {
                offset: start,
                length: stop - start,
                data,
            }),
        }
    };
    let mut at = offset;
    while at < end {
        let data = match lseek(file, at, libc::SEEK_DATA) {
            Ok(Some(d)) => d.max(at),
            Ok(None) => end,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                push(at, end, true);
                break;
            }
            Err(e) => return Err(e),
        };
        push(at, data.min(end), false);
        if data >= end {
            break;
        }
        // SEEK_HOLE from inside data always finds one (end of file counts
        // as a hole); treat the unexpected answers as "data to the end".
        let hole = match lseek(file, data, libc::SEEK_HOLE)? {
            Some(h) if h > data => h,
            _ => end,
        };
        push(data, hole.min(end), true);
        at = hole;
    }
    Ok(out)
}

/// Data extents `(offset, length)` inside `[start, end)`; see [`extents`].
pub fn data_extents(file: &File, start: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
    Ok(extents(file, start, end.saturating_sub(start))?
        .into_iter()
        .filter(|e| e.data)
        .map(|e| (e.offset, e.length))
        .collect())
}

/// `posix_fadvise(WILLNEED)`: start reading `[offset, offset+len)` into
/// the page cache.
pub fn will_need(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let (o, l) = (off_t(offset)?, off_t(len)?);
    // SAFETY: posix_fadvise only reads its integer arguments; the
    // descriptor is owned by `file`, which outlives the call.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), o, l, libc::POSIX_FADV_WILLNEED) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

fn off_t(v: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(v).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{v} does not fit a file offset"),
        )
    })
}

/// Whether the regular file at `path` holds no written byte at all
/// (entirely a hole, or empty): removing it loses nothing.
pub fn holds_no_data(path: &std::path::Path) -> io::Result<bool> {
    let f = File::open(path)?;
    let len = f.metadata()?.len();
    Ok(data_extents(&f, 0, len)?.is_empty())
}

/// Copy `len` bytes from `src` to `dst` within one file, skipping holes so
/// a sparse source stays sparse. The ranges must not overlap.
pub fn copy_range(
    file: &File,
    src: u64,
    dst: u64,
    len: u64,
    mut progress: impl FnMut(u64),
) -> io::Result<()> {
    debug_assert!(src + len <= dst || dst + len <= src, "overlapping copy");
    let mut buf = vec![0u8; 1 << 20];
    for (off, n) in data_extents(file, src, src + len)? {
        let mut done = 0;
        while done < n {
            let chunk = (n - done).min(buf.len() as u64) as usize;
            let from = off + done;
            file.read_exact_at(&mut buf[..chunk], from)?;
            file.write_all_at(&buf[..chunk], dst + (from - src))?;
            done += chunk as u64;
            progress(chunk as u64);
        }
    }
    Ok(())
}

/// `fallocate(mode, offset, len)`.
pub fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let (o, l) = (off_t(offset)?, off_t(len)?);
    // SAFETY: fallocate takes no pointers; the descriptor is owned by
    // `file`, which outlives the call.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, o, l) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// How [`flock`] locks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lock {
    Shared,
    Exclusive,
}

/// `flock(LOCK_SH | LOCK_EX, LOCK_NB)`: `Ok(false)` when another
/// descriptor holds a conflicting lock.
pub fn flock(file: &File, how: Lock) -> io::Result<bool> {
    let op = match how {
        Lock::Shared => libc::LOCK_SH,
        Lock::Exclusive => libc::LOCK_EX,
    };
    // SAFETY: flock takes no pointers; the descriptor is owned by `file`.
    let r = unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// `flock(LOCK_UN)`.
pub fn unlock(file: &File) {
    // SAFETY: flock takes no pointers; the descriptor is owned by `file`.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
}

/// This machine's host name ("?" when it cannot be read).
pub fn hostname() -> String {
    let mut b = [0u8; 256];
    // SAFETY: the buffer is valid for its whole length, and gethostname
    // writes at most that many bytes.
    let r = unsafe { libc::gethostname(b.as_mut_ptr().cast(), b.len()) };
    if r != 0 {
        return "?".into();
    }
    let n = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..n]).into_owned()
}

/// Bytes an unprivileged writer may still allocate on the file system
/// holding `path` (`fstatvfs`: available blocks × fragment size).
pub fn free_space(path: &std::path::Path) -> io::Result<u64> {
    let dir = File::open(path)?;
    // SAFETY: statvfs is plain old data, valid when zeroed.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatvfs writes one statvfs into `st`, which we own; the
    // descriptor is owned by `dir`.
    if unsafe { libc::fstatvfs(dir.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Make `[off, off+len)` read as zeros: punch a hole where the filesystem
/// can, write zeros where it cannot (block devices, old filesystems).
pub fn zero_range(file: &File, off: u64, len: u64) -> io::Result<()> {
    zero_range_with(file, off, len, |_| {})
}

/// [`zero_range`], calling `progress(done)` with the bytes zeroed so far
/// (once at the end when a hole was punched, per MiB when zeros are
/// written).
pub fn zero_range_with(
    file: &File,
    off: u64,
    len: u64,
    mut progress: impl FnMut(u64),
) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    if !is_block_device(file)? {
        match fallocate(
            file,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        ) {
            Ok(()) => {
                progress(len);
                return Ok(());
            }
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
            Err(e) => return Err(e),
        }
    }
    write_zeros(file, off, len, progress)
}

fn write_zeros(file: &File, off: u64, len: u64, mut progress: impl FnMut(u64)) -> io::Result<()> {
    let zeros = vec![0u8; 1 << 20];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], off + done)?;
        done += n as u64;
        progress(done);
    }
    Ok(())
}

/// Give `[off, off+len)` real storage that reads as zeros, so later writes
/// there cannot fail for want of space: `fallocate` on a regular file
/// (the range must be a hole: data already there is kept, not zeroed),
/// zeros written on a block device (which also wipes what a previous user
/// left there) or where the filesystem cannot allocate. `progress(done)`
/// gets the bytes handled so far.
pub fn allocate_range(
    file: &File,
    off: u64,
    len: u64,
    mut progress: impl FnMut(u64),
) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    if is_block_device(file)? {
        return write_zeros(file, off, len, progress);
    }
    // In steps, so a slow filesystem still shows progress.
    const STEP: u64 = 1 << 30;
    let mut done = 0;
    while done < len {
        let n = (len - done).min(STEP);
        let (o, l) = (
            libc::off_t::try_from(off + done).map_err(|_| io::Error::other("offset too large"))?,
            libc::off_t::try_from(n).map_err(|_| io::Error::other("length too large"))?,
        );
        // SAFETY: fallocate on a valid descriptor; no memory is passed.
        let r = unsafe { libc::fallocate(file.as_raw_fd(), 0, o, l) };
        if r != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
                return Err(e);
            }
            return write_zeros(file, off + done, len - done, |d| progress(done + d));
        }
        done += n;
        progress(done);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(16 << 20).unwrap();
        f.write_all_at(&[7u8; 4096], 1 << 20).unwrap();
        copy_range(&f, 0, 8 << 20, 4 << 20, |_| {}).unwrap();
        let mut b = [0u8; 4096];
        f.read_exact_at(&mut b, (8 << 20) + (1 << 20)).unwrap();
        assert_eq!(b, [7u8; 4096]);
        let ext = data_extents(&f, 8 << 20, 12 << 20).unwrap();
        assert_eq!(ext.len(), 1, "{ext:?}");
    }

    #[test]
    fn zero_range_reads_back_zeros() {
        let f = tempfile::tempfile().unwrap();
        f.write_all_at(&[9u8; 8192], 0).unwrap();
        zero_range(&f, 1000, 5000).unwrap();
        let mut b = [0u8; 8192];
        f.read_exact_at(&mut b, 0).unwrap();
        assert!(b[..1000].iter().all(|&x| x == 9));
        assert!(b[1000..6000].iter().all(|&x| x == 0));
        assert!(b[6000..].iter().all(|&x| x == 9));
    }

    #[test]
    fn allocate_range_gives_a_hole_storage_that_reads_zero() {
        use std::os::unix::fs::MetadataExt;
        let f = tempfile::tempfile().unwrap();
        f.set_len(8 << 20).unwrap();
        assert!(f.metadata().unwrap().blocks() * 512 < 1 << 20);
        let mut seen = Vec::new();
        allocate_range(&f, 1 << 20, 4 << 20, |d| seen.push(d)).unwrap();
        assert!(f.metadata().unwrap().blocks() * 512 >= 4 << 20);
        assert_eq!(seen.last(), Some(&(4 << 20)));
        let mut b = vec![1u8; 4 << 20];
        f.read_exact_at(&mut b, 1 << 20).unwrap();
        assert!(b.iter().all(|&x| x == 0));
    }

    const BLOCK: u64 = 4096;
    const BLOCKS: usize = 64;

    /// Runs of the model (one bool per block: written or not), clipped to
    /// `[offset, end)`, with bytes past the file's end as a hole.
    fn model(written: &[bool], offset: u64, end: u64) -> Vec<Extent> {
        let mut out: Vec<Extent> = Vec::new();
        for at in offset..end {
            let block = (at / BLOCK) as usize;
            let data = written.get(block).copied().unwrap_or(false);
            match out.last_mut() {
                Some(last) if last.data == data => last.length += 1,
                _ => out.push(Extent {
                    offset: at,
                    length: 1,
                    data,
                }),
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Whatever blocks are written and whatever window is asked for,
        /// the runs cover the window exactly and match what was written.
        #[test]
        fn extents_match_the_blocks_written(
            written in proptest::collection::vec(any::<bool>(), BLOCKS),
            start in 0u64..(BLOCKS as u64 + 4) * BLOCK,
            len in 0u64..(BLOCKS as u64 + 4) * BLOCK,
        ) {
            let f = tempfile::tempfile().unwrap();
            f.set_len(BLOCKS as u64 * BLOCK).unwrap();
            for (i, _) in written.iter().enumerate().filter(|(_, w)| **w) {
                f.write_all_at(&[0xEE; BLOCK as usize], i as u64 * BLOCK).unwrap();
            }
            let got = extents(&f, start, len).unwrap();
            prop_assert_eq!(got, model(&written, start, start + len));
        }
    }
}
