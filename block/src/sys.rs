//! Synchronous whole-range file operations used by provisioning (create,
//! resize, scan): backing size, data extents, sparse copy, zeroing. The
//! gateway's per-request I/O goes through [`crate::engine`] instead.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::io::AsRawFd;

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

fn lseek(file: &File, off: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let off = libc::off_t::try_from(off)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
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

/// Data extents `(offset, length)` inside `[start, end)`, from SEEK_DATA /
/// SEEK_HOLE. Where the filesystem cannot tell, the whole range is data.
pub fn data_extents(file: &File, start: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut at = start;
    while at < end {
        let data = match lseek(file, at, libc::SEEK_DATA) {
            Ok(Some(d)) => d,
            Ok(None) => break,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                return Ok(vec![(start, end - start)]);
            }
            Err(e) => return Err(e),
        };
        if data >= end {
            break;
        }
        let hole = lseek(file, data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
        out.push((data, hole - data));
        at = hole;
    }
    Ok(out)
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

/// Make `[off, off+len)` read as zeros: punch a hole where the filesystem
/// can, write zeros where it cannot (block devices, old filesystems).
pub fn zero_range(file: &File, off: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    if !is_block_device(file)? {
        let (o, l) = (
            libc::off_t::try_from(off).map_err(|_| io::Error::other("offset too large"))?,
            libc::off_t::try_from(len).map_err(|_| io::Error::other("length too large"))?,
        );
        // SAFETY: fallocate on a valid descriptor; no memory is passed.
        let r = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                o,
                l,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
            return Err(e);
        }
    }
    let zeros = vec![0u8; 1 << 20];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], off + done)?;
        done += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
