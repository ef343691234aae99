//! Helpers shared by the fuzz targets in `fuzz_targets/`: in-memory files
//! for decoders that read through a file, the "every flip is refused"
//! check of checksummed structures, and a byte cursor that lets one input
//! choose parameters as well as the bytes under test.

use std::fs::File;
use std::io::Write;
use std::os::fd::FromRawFd;

/// An anonymous in-memory file holding `bytes` (and `len` bytes in all,
/// sparse past `bytes`), for decoders that read a `File`.
pub fn memfd(bytes: &[u8], len: u64) -> File {
    // SAFETY: memfd_create with a NUL-terminated name and no flags returns
    // a new descriptor or -1; we own it from here.
    let fd = unsafe { libc::memfd_create(c"lungate-fuzz".as_ptr(), 0) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let mut f = unsafe { File::from_raw_fd(fd) };
    f.write_all(bytes).expect("write memfd");
    f.set_len(len.max(bytes.len() as u64)).expect("size memfd");
    f
}

/// An anonymous in-memory file of `bytes.len()` bytes holding `bytes`,
/// written only where a 4 KiB block is not all zeros (the rest stays a
/// hole): large, mostly empty disk images cost what their data costs.
pub fn memfd_sparse(bytes: &[u8]) -> File {
    use std::os::unix::fs::FileExt;
    let f = memfd(&[], bytes.len() as u64);
    for (i, c) in bytes.chunks(4096).enumerate() {
        if c.iter().any(|&x| x != 0) {
            f.write_all_at(c, i as u64 * 4096).expect("write memfd");
        }
    }
    f
}

/// Assert that `accepts` refuses `valid` with any one byte changed: the
/// bit flipped in byte `i` is `i % 8`, so over the bytes every bit
/// position is hit. `limit` bounds the work on long inputs (bytes are then
/// sampled evenly, always including the first and last).
pub fn assert_every_flip_refused(valid: &[u8], limit: usize, accepts: impl Fn(&[u8]) -> bool) {
    let n = valid.len();
    if n == 0 {
        return;
    }
    let step = n.div_ceil(limit.max(1)).max(1);
    let mut c = valid.to_vec();
    let mut positions: Vec<usize> = (0..n).step_by(step).collect();
    positions.push(n - 1);
    for i in positions {
        c[i] ^= 1 << (i % 8);
        assert!(
            !accepts(&c),
            "a copy with bit {} of byte {i} (of {n}) flipped was accepted",
            i % 8
        );
        c[i] ^= 1 << (i % 8);
    }
}

/// A cursor over the fuzz input: parameters first, the rest is the bytes
/// under test. Reads past the end give zeros.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }
    pub fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((b, rest)) => {
                self.data = rest;
                *b
            }
            None => 0,
        }
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    pub fn u64(&mut self) -> u64 {
        (u64::from(self.u32())) | (u64::from(self.u32()) << 32)
    }
    /// Up to `n` bytes.
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (a, b) = self.data.split_at(n);
        self.data = b;
        a
    }
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }
}

/// `bytes` padded with zeros (or cut) to exactly `len` bytes.
pub fn padded(bytes: &[u8], len: usize) -> Vec<u8> {
    let mut v = bytes[..bytes.len().min(len)].to_vec();
    v.resize(len, 0);
    v
}

/// Store blake3 of `b[..at]` at `b[at..at + 32]`: the fuzzer's mutations
/// then reach the checks behind the checksum.
pub fn fix_blake3(b: &mut [u8], at: usize) {
    let sum = blake3::hash(&b[..at]);
    b[at..at + 32].copy_from_slice(sum.as_bytes());
}

/// CRC-32 (IEEE, as GPT uses it).
pub fn crc32(b: &[u8]) -> u32 {
    let mut c = !0u32;
    for &x in b {
        c ^= u32::from(x);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}
