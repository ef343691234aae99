//! Allocation map of a byte range from `lseek(SEEK_DATA / SEEK_HOLE)`.
//!
//! The answer is advisory (a hole may be filled a moment later) and
//! conservative: where the filesystem cannot tell, everything is data.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;

use super::op::check_range;

/// A run of bytes that is either all data or all hole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    /// `false`: a hole, which reads as zeros.
    pub data: bool,
}

enum Seek {
    At(u64),
    /// ENXIO: no data (for SEEK_DATA) at or after the offset, i.e. at or
    /// past end of file.
    Nothing,
    /// EINVAL: the filesystem does not implement SEEK_DATA/SEEK_HOLE.
    Unsupported,
}

fn seek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Seek> {
    // SAFETY: lseek takes no pointers; `file` keeps the descriptor open.
    // `offset` fits in off_t (checked by the caller).
    let r = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
    if r >= 0 {
        return Ok(Seek::At(r as u64));
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENXIO) => Ok(Seek::Nothing),
        Some(libc::EINVAL) => Ok(Seek::Unsupported),
        _ => Err(e),
    }
}

/// Data and hole runs covering exactly `[offset, offset+len)`, in order,
/// adjacent runs of the same kind merged. Bytes past end of file are a hole.
///
/// Uses the descriptor's file position (lseek moves it); engine reads and
/// writes are positional, so that is harmless.
pub fn extents(file: &File, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
    check_range(offset, len)?;
    let end = offset + len;
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
        let data = match seek(file, at, libc::SEEK_DATA)? {
            Seek::At(d) => d.max(at),
            Seek::Nothing => end,
            Seek::Unsupported => {
                push(at, end, true);
                break;
            }
        };
        push(at, data.min(end), false);
        if data >= end {
            break;
        }
        // SEEK_HOLE from inside data always finds one (end of file counts
        // as a hole); treat the unexpected answers as "data to the end".
        let hole = match seek(file, data, libc::SEEK_HOLE)? {
            Seek::At(h) if h > data => h,
            _ => end,
        };
        push(data, hole.min(end), true);
        at = hole;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use proptest::prelude::*;

    use super::*;

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
