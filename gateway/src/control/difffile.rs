//! The diff file (contract format), written and applied on one volume until
//! `Group::write_diff` / `Group::apply_diff` land (MERGE: use Group).
//!
//! Layout, integers little-endian:
//! ```text
//! "LGDIFF01"  lun uuid [16]  size u64  cluster_size u32
//! from_len u16  from [from_len]  to_len u16  to [to_len]   (to_len 0: live)
//! count u64
//! count × { offset u64  length u64  kind u8 (1 data, 2 zero)  data [length] if data }
//! blake3 [32] of every byte before it
//! ```
//! `apply` checks the trailer, magic, size and cluster size and every
//! extent's bounds before writing a byte.

use std::io::Write;

use lun_manager::volume::{ChangeKind, Volume};
use uuid::Uuid;

use super::ops::{OpError, OpResult};

const MAGIC: &[u8; 8] = b"LGDIFF01";
const KIND_DATA: u8 = 1;
const KIND_ZERO: u8 = 2;
/// Data is copied in pieces of at most this size.
const PIECE: u64 = 1 << 20;

/// Write the diff from snapshot `from` to `to` (live if `None`) to `out`.
pub fn write(
    v: &Volume,
    lun: Uuid,
    from: &str,
    to: Option<&str>,
    out: &mut impl Write,
) -> OpResult<()> {
    let changes = v.diff(from, to)?;
    let mut h = blake3::Hasher::new();
    let mut put = |b: &[u8]| -> OpResult<()> {
        h.update(b);
        out.write_all(b)
            .map_err(|e| OpError::Internal(format!("writing the diff: {e}")))
    };
    put(MAGIC)?;
    put(lun.as_bytes())?;
    put(&v.size().to_le_bytes())?;
    put(&(v.cluster_size() as u32).to_le_bytes())?;
    for name in [from, to.unwrap_or("")] {
        put(&(name.len() as u16).to_le_bytes())?;
        put(name.as_bytes())?;
    }
    put(&(changes.len() as u64).to_le_bytes())?;
    let mut buf = Vec::new();
    for c in &changes {
        put(&c.offset.to_le_bytes())?;
        put(&c.length.to_le_bytes())?;
        match c.kind {
            ChangeKind::Zero => put(&[KIND_ZERO])?,
            ChangeKind::Data => {
                put(&[KIND_DATA])?;
                let mut at = c.offset;
                while at < c.offset + c.length {
                    let n = (c.offset + c.length - at).min(PIECE) as usize;
                    buf.resize(n, 0);
                    match to {
                        Some(t) => v.read_snapshot(t, at, &mut buf)?,
                        None => v.read(at, &mut buf)?,
                    }
                    put(&buf)?;
                    at += n as u64;
                }
            }
        }
    }
    let sum = h.finalize();
    out.write_all(sum.as_bytes())
        .map_err(|e| OpError::Internal(format!("writing the diff: {e}")))
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> OpResult<&'a [u8]> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| OpError::BadRequest("diff file is truncated".into()))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u64(&mut self) -> OpResult<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn u32(&mut self) -> OpResult<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u16(&mut self) -> OpResult<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }
}

enum Op<'a> {
    Data(u64, &'a [u8]),
    Zero(u64, u64),
}

/// Verify all of `file`, then write its extents to the live volume.
pub fn apply(v: &Volume, file: &[u8]) -> OpResult<()> {
    let bad = |m: String| OpError::BadRequest(m);
    if file.len() < MAGIC.len() + 32 {
        return Err(bad("diff file is too short".into()));
    }
    let (body, sum) = file.split_at(file.len() - 32);
    if blake3::hash(body).as_bytes() != sum {
        return Err(bad(
            "diff file checksum mismatch (corrupt or truncated)".into()
        ));
    }
    let mut r = Reader { b: body, at: 0 };
    if r.take(8)? != MAGIC {
        return Err(bad("not a lungate diff file (bad magic)".into()));
    }
    r.take(16)?; // source LUN: a diff may be applied to a clone
    let size = r.u64()?;
    let cs = u64::from(r.u32()?);
    if size != v.size() || cs != v.cluster_size() {
        return Err(bad(format!(
            "diff is for a volume of {size} bytes with {cs}-byte clusters; this one has {} and {}",
            v.size(),
            v.cluster_size()
        )));
    }
    for _ in 0..2 {
        let n = r.u16()? as usize;
        r.take(n)?;
    }
    let count = r.u64()?;
    let mut ops = Vec::new();
    for _ in 0..count {
        let (off, len) = (r.u64()?, r.u64()?);
        if off.checked_add(len).is_none_or(|e| e > size) {
            return Err(bad(format!(
                "extent offset {off} + length {len} exceeds volume size {size}"
            )));
        }
        match r.take(1)?[0] {
            KIND_DATA => {
                let n = usize::try_from(len).map_err(|_| bad("extent too long".into()))?;
                ops.push(Op::Data(off, r.take(n)?));
            }
            KIND_ZERO => ops.push(Op::Zero(off, len)),
            k => return Err(bad(format!("unknown extent kind {k}"))),
        }
    }
    if r.at != body.len() {
        return Err(bad("trailing bytes after the last extent".into()));
    }
    for op in ops {
        match op {
            Op::Data(off, d) => v.write(off, d)?,
            Op::Zero(off, len) => v.write_zeroes(off, len, true)?,
        }
    }
    Ok(v.flush()?)
}
