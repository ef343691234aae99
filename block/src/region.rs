//! The region views: one disk of a LUN as a device of its own, the top of
//! an export's stack. Two views cover lungate's three layouts, and
//! [`View`] describes which one a disk gets (the LUN format decides,
//! outside this crate):
//!
//! * A [`Region`] shows `[base, base + size)` of the device below as
//!   `[0, size)`: the *offset* layout (the disk lies after the GPT,
//!   `base > 0`) and the *truncate* layout (the disk starts at byte 0 and
//!   the state region and footer lie past `size`).
//! * An [`Aligned`] view shows `[0, size)` of the device below at the same
//!   offsets, except the *shadowed range* `[0, shadow_len)`, whose bytes
//!   live in a shadow area elsewhere in the device (the *aligned* layout:
//!   the LUN's own GPT and label keep the first sectors, the guest's own
//!   partition table lives in the shadow area). A request that touches the
//!   shadowed range is split; one that does not is passed straight through
//!   after one compare.
//!
//! Every request range is checked here, once, with checked arithmetic,
//! against the view's size, before it is translated; so nothing outside
//! the disk is ever read, written, trimmed, queried or cached, whatever a
//! client sends, and in the aligned view nothing below `shadow_len` of the
//! device below is ever reached. Layers below only translate.

use std::io;
use std::ops::Range;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::future::{try_join, try_join_all};

use crate::device::{check_range, done, BlockDevice, Caps, Chunk, Extent, IoFuture, RangeError};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegionError {
    #[error("region offset {base} + length {size} overflows 64 bits")]
    Overflow { base: u64, size: u64 },
    #[error("region [{base}, {end}) lies beyond the device's {device} bytes")]
    Beyond { base: u64, end: u64, device: u64 },
    #[error("shadowed range of {shadow_len} bytes is empty or longer than the disk's {size}")]
    ShadowLength { shadow_len: u64, size: u64 },
    #[error("shadow area [{at}, +{len}) overlaps the disk [0, {size}) or overflows 64 bits")]
    ShadowPlace { at: u64, len: u64, size: u64 },
}

/// How one disk appears in the device below its view: what the top of an
/// export's stack is built from ([`View::over`]), and what synchronous
/// code (provisioning, import, tests) maps disk offsets with
/// ([`View::pieces`]), so both agree byte for byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// `[base, base + size)` of the device below (offset, truncate).
    Window { base: u64, size: u64 },
    /// `[0, size)` at the same offsets but for the shadowed range (aligned).
    Aligned(ShadowMap),
}

impl View {
    /// Size of the disk in bytes.
    pub fn size(&self) -> u64 {
        match self {
            View::Window { size, .. } => *size,
            View::Aligned(m) => m.size,
        }
    }

    /// Where `[offset, offset + len)` of the disk lives in the device below,
    /// in request order; refused (checked arithmetic) unless it lies inside
    /// the disk and its device offsets fit 64 bits.
    pub fn pieces(&self, offset: u64, len: u64) -> Result<Pieces, RangeError> {
        match self {
            View::Window { base, size } => {
                check_range(offset, len, *size)?;
                let at = base
                    .checked_add(offset)
                    .filter(|at| at.checked_add(len).is_some())
                    .ok_or(RangeError::Overflow {
                        offset: *base,
                        length: offset.saturating_add(len),
                    })?;
                Ok(Pieces::one(Piece {
                    disk: offset,
                    at,
                    len,
                }))
            }
            View::Aligned(m) => m.split(offset, len),
        }
    }

    /// The ranges of the device below that hold the disk's bytes.
    pub fn device_ranges(&self) -> Vec<Range<u64>> {
        match self {
            View::Window { base, size } => {
                std::iter::once(*base..base.saturating_add(*size)).collect()
            }
            View::Aligned(m) => vec![m.shadow_len..m.size, m.shadow_at..m.shadow_end()],
        }
    }

    /// The view over `inner`: the top of the disk's stack.
    pub fn over(self, inner: Arc<dyn BlockDevice>) -> Result<Arc<dyn BlockDevice>, RegionError> {
        Ok(match self {
            View::Window { base, size } => Arc::new(Region::new(inner, base, size)?),
            View::Aligned(m) => Arc::new(Aligned::new(inner, m)?),
        })
    }
}

/// One contiguous piece of a request: `len` bytes at disk offset `disk`
/// live at offset `at` of the device below.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub disk: u64,
    pub at: u64,
    pub len: u64,
}

/// The (one or two) pieces of a request, in disk order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pieces {
    p: [Piece; 2],
    n: usize,
}

impl Pieces {
    fn one(p: Piece) -> Pieces {
        Pieces { p: [p, p], n: 1 }
    }

    pub fn as_slice(&self) -> &[Piece] {
        &self.p[..self.n]
    }
}

impl std::ops::Deref for Pieces {
    type Target = [Piece];
    fn deref(&self) -> &[Piece] {
        self.as_slice()
    }
}

/// The aligned layout's mapping: disk bytes `[0, shadow_len)` live at
/// `[shadow_at, shadow_at + shadow_len)` of the device below, every other
/// disk byte at its own offset. Validated at construction: the shadowed
/// range is non-empty and shorter than the disk, and the shadow area lies
/// past the disk's end without overflowing, so translated offsets never
/// overflow and the two parts never alias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShadowMap {
    size: u64,
    shadow_len: u64,
    shadow_at: u64,
}

impl ShadowMap {
    pub fn new(size: u64, shadow_len: u64, shadow_at: u64) -> Result<ShadowMap, RegionError> {
        if shadow_len == 0 || shadow_len >= size {
            return Err(RegionError::ShadowLength { shadow_len, size });
        }
        if shadow_at < size || shadow_at.checked_add(shadow_len).is_none() {
            return Err(RegionError::ShadowPlace {
                at: shadow_at,
                len: shadow_len,
                size,
            });
        }
        Ok(ShadowMap {
            size,
            shadow_len,
            shadow_at,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }
    pub fn shadow_len(&self) -> u64 {
        self.shadow_len
    }
    pub fn shadow_at(&self) -> u64 {
        self.shadow_at
    }
    fn shadow_end(&self) -> u64 {
        self.shadow_at + self.shadow_len
    }

    /// Where `[offset, offset + len)` lives: the bounds check of the
    /// aligned view, then one compare for a request past the shadowed range.
    pub fn split(&self, offset: u64, len: u64) -> Result<Pieces, RangeError> {
        check_range(offset, len, self.size)?;
        // offset + len <= size < shadow_at, and shadow_at + shadow_len fits.
        let end = offset + len;
        if offset >= self.shadow_len {
            return Ok(Pieces::one(Piece {
                disk: offset,
                at: offset,
                len,
            }));
        }
        let cut = end.min(self.shadow_len);
        let shadow = Piece {
            disk: offset,
            at: self.shadow_at + offset,
            len: cut - offset,
        };
        if end <= self.shadow_len {
            return Ok(Pieces::one(shadow));
        }
        let rest = Piece {
            disk: cut,
            at: cut,
            len: end - cut,
        };
        Ok(Pieces {
            p: [shadow, rest],
            n: 2,
        })
    }
}

pub struct Region {
    inner: Arc<dyn BlockDevice>,
    base: u64,
    size: u64,
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region")
            .field("base", &self.base)
            .field("size", &self.size)
            .finish()
    }
}

impl Region {
    /// The view of `[base, base + size)` of `inner`.
    pub fn new(inner: Arc<dyn BlockDevice>, base: u64, size: u64) -> Result<Region, RegionError> {
        let end = base
            .checked_add(size)
            .ok_or(RegionError::Overflow { base, size })?;
        let device = inner.size();
        if end > device {
            return Err(RegionError::Beyond { base, end, device });
        }
        Ok(Region { inner, base, size })
    }

    /// Offset of the region in the device below.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// The region offset of `[offset, offset + len)`, or why not.
    fn at(&self, offset: u64, len: u64) -> Result<u64, RangeError> {
        check_range(offset, len, self.size)?;
        // base + offset + len <= base + size, which `new` proved fits.
        Ok(self.base + offset)
    }
}

/// Device extents of a piece mapped back to disk offsets (`disk + (x -
/// at)`), clipped to the piece, gaps filled as data, appended to `out`
/// (merging with its last run).
fn map_back(out: &mut Vec<Extent>, raw: Vec<Extent>, p: Piece) {
    let mut push = |o: u64, l: u64, data: bool| match out.last_mut() {
        Some(x) if x.data == data && x.offset + x.length == o => x.length += l,
        _ => out.push(Extent {
            offset: o,
            length: l,
            data,
        }),
    };
    // The piece lies inside the device below, so at + len fits.
    let (start, end) = (p.at, p.at + p.len);
    let mut pos = start;
    for x in raw {
        let Some(x_end) = x.offset.checked_add(x.length) else {
            continue;
        };
        let lo = x.offset.max(pos);
        let hi = x_end.min(end);
        if hi <= lo {
            continue;
        }
        if lo > pos {
            push(p.disk + (pos - start), lo - pos, true);
        }
        push(p.disk + (lo - start), hi - lo, x.data);
        pos = hi;
    }
    if pos < end {
        push(p.disk + (pos - start), end - pos, true);
    }
}

/// Device ranges of a piece mapped back to disk offsets, clipped to the
/// piece, appended to `out` (merging with its last range).
fn ranges_back(out: &mut Vec<Range<u64>>, raw: Vec<Range<u64>>, p: Piece) {
    // The piece lies inside the device below, so at + len fits.
    let (start, end) = (p.at, p.at + p.len);
    for r in raw {
        let (lo, hi) = (r.start.max(start), r.end.min(end));
        if hi <= lo {
            continue;
        }
        let (s, e) = (p.disk + (lo - start), p.disk + (hi - start));
        match out.last_mut() {
            Some(l) if l.end == s => l.end = e,
            _ => out.push(s..e),
        }
    }
}

/// Chunks read at device offsets, moved to disk offsets.
fn chunks_back(chunks: Vec<Chunk>, p: Piece) -> impl Iterator<Item = Chunk> {
    // Every chunk lies inside the piece: offset >= p.at.
    let to_disk = move |o: u64| p.disk + (o - p.at);
    chunks.into_iter().map(move |c| match c {
        Chunk::Data { offset, data } => Chunk::Data {
            offset: to_disk(offset),
            data,
        },
        Chunk::Hole { offset, length } => Chunk::Hole {
            offset: to_disk(offset),
            length,
        },
    })
}

fn refuse<T: Send + 'static>(e: RangeError) -> IoFuture<T> {
    done(Err(io::Error::from(e)))
}

impl BlockDevice for Region {
    fn size(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> Caps {
        self.inner.caps()
    }

    fn read(&self, offset: u64, len: usize) -> IoFuture<Bytes> {
        match self.at(offset, len as u64) {
            Ok(at) => self.inner.read(at, len),
            Err(e) => refuse(e),
        }
    }

    fn read_chunks(&self, offset: u64, len: usize) -> IoFuture<Vec<Chunk>> {
        let at = match self.at(offset, len as u64) {
            Ok(at) => at,
            Err(e) => return refuse(e),
        };
        let f = self.inner.read_chunks(at, len);
        let p = Piece {
            disk: offset,
            at,
            len: len as u64,
        };
        Box::pin(async move { Ok(chunks_back(f.await?, p).collect()) })
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> IoFuture<()> {
        match self.at(offset, data.len() as u64) {
            Ok(at) => self.inner.write(at, data, fua),
            Err(e) => refuse(e),
        }
    }

    fn flush(&self) -> IoFuture<()> {
        self.inner.flush()
    }

    fn trim(&self, offset: u64, len: u64) -> IoFuture<()> {
        match self.at(offset, len) {
            Ok(at) => self.inner.trim(at, len),
            Err(e) => refuse(e),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> IoFuture<()> {
        match self.at(offset, len) {
            Ok(at) => self.inner.write_zeroes(at, len, may_trim),
            Err(e) => refuse(e),
        }
    }

    fn extents(&self, offset: u64, len: u64) -> IoFuture<Vec<Extent>> {
        let at = match self.at(offset, len) {
            Ok(at) => at,
            Err(e) => return refuse(e),
        };
        let f = self.inner.extents(at, len);
        let p = Piece {
            disk: offset,
            at,
            len,
        };
        Box::pin(async move {
            let mut out = Vec::new();
            map_back(&mut out, f.await?, p);
            Ok(out)
        })
    }

    fn cache(&self, offset: u64, len: u64) -> IoFuture<()> {
        match self.at(offset, len) {
            Ok(at) => self.inner.cache(at, len),
            Err(e) => refuse(e),
        }
    }

    fn changed_since(&self, snapshot: &str, offset: u64, len: u64) -> IoFuture<Vec<Range<u64>>> {
        let at = match self.at(offset, len) {
            Ok(at) => at,
            Err(e) => return refuse(e),
        };
        let f = self.inner.changed_since(snapshot, at, len);
        let p = Piece {
            disk: offset,
            at,
            len,
        };
        Box::pin(async move {
            let mut out = Vec::new();
            ranges_back(&mut out, f.await?, p);
            Ok(out)
        })
    }
}

/// The aligned view: see the module doc and [`ShadowMap`].
pub struct Aligned {
    inner: Arc<dyn BlockDevice>,
    map: ShadowMap,
}

impl std::fmt::Debug for Aligned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Aligned").field("map", &self.map).finish()
    }
}

impl Aligned {
    /// The aligned view of `inner`; the disk and the shadow area must both
    /// lie inside it.
    pub fn new(inner: Arc<dyn BlockDevice>, map: ShadowMap) -> Result<Aligned, RegionError> {
        let device = inner.size();
        if map.shadow_end() > device {
            return Err(RegionError::Beyond {
                base: map.shadow_at,
                end: map.shadow_end(),
                device,
            });
        }
        // size < shadow_at <= device, so the disk fits too.
        Ok(Aligned { inner, map })
    }

    pub fn map(&self) -> &ShadowMap {
        &self.map
    }

    /// Run `op` on every piece (called now, in disk order, so a layer below
    /// that cares about arrival order sees it) and wait for all of them.
    fn each(
        &self,
        offset: u64,
        len: u64,
        op: impl Fn(&dyn BlockDevice, Piece) -> IoFuture<()>,
    ) -> IoFuture<()> {
        let pieces = match self.map.split(offset, len) {
            Ok(p) => p,
            Err(e) => return refuse(e),
        };
        if let [p] = *pieces {
            return op(&*self.inner, p);
        }
        let fs: Vec<_> = pieces.iter().map(|&p| op(&*self.inner, p)).collect();
        Box::pin(async move { try_join_all(fs).await.map(drop) })
    }
}

impl BlockDevice for Aligned {
    fn size(&self) -> u64 {
        self.map.size
    }

    fn caps(&self) -> Caps {
        self.inner.caps()
    }

    fn read(&self, offset: u64, len: usize) -> IoFuture<Bytes> {
        let pieces = match self.map.split(offset, len as u64) {
            Ok(p) => p,
            Err(e) => return refuse(e),
        };
        match *pieces {
            [p] => self.inner.read(p.at, len),
            [a, b] => {
                let fa = self.inner.read(a.at, a.len as usize);
                let fb = self.inner.read(b.at, b.len as usize);
                Box::pin(async move {
                    let (a, b) = try_join(fa, fb).await?;
                    let mut out = BytesMut::with_capacity(len);
                    out.extend_from_slice(&a);
                    out.extend_from_slice(&b);
                    Ok(out.freeze())
                })
            }
            _ => unreachable!("a request has one or two pieces"),
        }
    }

    fn read_chunks(&self, offset: u64, len: usize) -> IoFuture<Vec<Chunk>> {
        let pieces = match self.map.split(offset, len as u64) {
            Ok(p) => p,
            Err(e) => return refuse(e),
        };
        if let [p] = *pieces {
            if p.at == p.disk {
                return self.inner.read_chunks(p.at, len);
            }
        }
        let fs: Vec<_> = pieces
            .iter()
            .map(|&p| {
                let f = self.inner.read_chunks(p.at, p.len as usize);
                async move { Ok::<_, io::Error>(chunks_back(f.await?, p).collect::<Vec<_>>()) }
            })
            .collect();
        Box::pin(async move { Ok(try_join_all(fs).await?.concat()) })
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> IoFuture<()> {
        self.each(offset, data.len() as u64, |d, p| {
            let from = (p.disk - offset) as usize;
            d.write(p.at, data.slice(from..from + p.len as usize), fua)
        })
    }

    fn flush(&self) -> IoFuture<()> {
        self.inner.flush()
    }

    fn trim(&self, offset: u64, len: u64) -> IoFuture<()> {
        self.each(offset, len, |d, p| d.trim(p.at, p.len))
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> IoFuture<()> {
        self.each(offset, len, |d, p| d.write_zeroes(p.at, p.len, may_trim))
    }

    /// The shadowed range is reported as data (it is the guest's partition
    /// table, and where it lives is nobody's business); the rest is the
    /// device's own answer at the same offsets.
    fn extents(&self, offset: u64, len: u64) -> IoFuture<Vec<Extent>> {
        let pieces = match self.map.split(offset, len) {
            Ok(p) => p,
            Err(e) => return refuse(e),
        };
        let mut out = Vec::new();
        let mut below = None;
        for &p in pieces.iter() {
            if p.at == p.disk {
                below = Some((self.inner.extents(p.at, p.len), p));
            } else if p.len > 0 {
                out.push(Extent {
                    offset: p.disk,
                    length: p.len,
                    data: true,
                });
            }
        }
        Box::pin(async move {
            if let Some((f, p)) = below {
                map_back(&mut out, f.await?, p);
            }
            Ok(out)
        })
    }

    fn cache(&self, offset: u64, len: u64) -> IoFuture<()> {
        self.each(offset, len, |d, p| d.cache(p.at, p.len))
    }

    /// Each piece asks the device below where it lives (the shadowed
    /// range's changes are those of its shadow area), mapped back to disk
    /// offsets in disk order.
    fn changed_since(&self, snapshot: &str, offset: u64, len: u64) -> IoFuture<Vec<Range<u64>>> {
        let pieces = match self.map.split(offset, len) {
            Ok(p) => p,
            Err(e) => return refuse(e),
        };
        let fs: Vec<_> = pieces
            .iter()
            .map(|&p| (self.inner.changed_since(snapshot, p.at, p.len), p))
            .collect();
        Box::pin(async move {
            let mut out = Vec::new();
            for (f, p) in fs {
                ranges_back(&mut out, f.await?, p);
            }
            Ok(out)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use proptest::prelude::*;

    use super::*;

    /// Records every range that reaches it.
    #[derive(Default)]
    struct Probe {
        size: u64,
        seen: Mutex<Vec<(u64, u64)>>,
    }

    impl BlockDevice for Probe {
        fn size(&self) -> u64 {
            self.size
        }
        fn caps(&self) -> Caps {
            Caps::default()
        }
        fn read(&self, offset: u64, len: usize) -> IoFuture<Bytes> {
            self.seen.lock().unwrap().push((offset, len as u64));
            done(Ok(Bytes::from(vec![0u8; len])))
        }
        fn write(&self, offset: u64, data: Bytes, _: bool) -> IoFuture<()> {
            self.seen.lock().unwrap().push((offset, data.len() as u64));
            done(Ok(()))
        }
        fn flush(&self) -> IoFuture<()> {
            done(Ok(()))
        }
        fn trim(&self, offset: u64, len: u64) -> IoFuture<()> {
            self.seen.lock().unwrap().push((offset, len));
            done(Ok(()))
        }
        fn write_zeroes(&self, offset: u64, len: u64, _: bool) -> IoFuture<()> {
            self.seen.lock().unwrap().push((offset, len));
            done(Ok(()))
        }
        fn extents(&self, offset: u64, len: u64) -> IoFuture<Vec<Extent>> {
            self.seen.lock().unwrap().push((offset, len));
            done(Ok(vec![Extent {
                offset: 0,
                length: self.size,
                data: false,
            }]))
        }
        fn cache(&self, offset: u64, len: u64) -> IoFuture<()> {
            self.seen.lock().unwrap().push((offset, len));
            done(Ok(()))
        }
    }

    fn block_on<T>(f: IoFuture<T>) -> io::Result<T> {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn a_region_past_the_device_or_u64_is_refused() {
        let p = Arc::new(Probe {
            size: 1000,
            ..Default::default()
        });
        assert!(matches!(
            Region::new(p.clone(), u64::MAX, 2),
            Err(RegionError::Overflow { .. })
        ));
        assert_eq!(
            Region::new(p, 100, 901).unwrap_err(),
            RegionError::Beyond {
                base: 100,
                end: 1001,
                device: 1000
            }
        );
    }

    #[test]
    fn extents_map_back_to_region_offsets_and_cover_the_request() {
        let p = Arc::new(Probe {
            size: 1 << 20,
            ..Default::default()
        });
        let r = Region::new(p, 4096, 65536).unwrap();
        let x = block_on(r.extents(100, 1000)).unwrap();
        assert_eq!(
            x,
            vec![Extent {
                offset: 100,
                length: 1000,
                data: false
            }]
        );
    }

    proptest! {
        /// Whatever a client asks, what reaches the device below lies
        /// inside [base, base + size), and everything refused would have
        /// escaped.
        #[test]
        fn nothing_reaches_outside_the_region(base in 0u64..(1 << 40), size in 0u64..(1 << 30),
                                              offset in any::<u64>(), len in any::<u32>(),
                                              near_end in any::<bool>(), op in 0u8..6) {
            let p = Arc::new(Probe { size: base + size, ..Default::default() });
            let r = Region::new(p.clone(), base, size).unwrap();
            let offset = if near_end { size.saturating_sub(offset % 8192) } else { offset };
            let len = u64::from(len) % (1 << 20);
            let res = match op {
                0 => block_on(r.read(offset, len as usize)).map(drop),
                1 => block_on(r.write(offset, Bytes::from(vec![0u8; len as usize]), false)),
                2 => block_on(r.trim(offset, len)),
                3 => block_on(r.write_zeroes(offset, len, true)),
                4 => block_on(r.extents(offset, len)).map(drop),
                _ => block_on(r.cache(offset, len)),
            };
            let escapes = offset.checked_add(len).is_none_or(|e| e > size);
            prop_assert_eq!(res.is_err(), escapes);
            for (o, l) in p.seen.lock().unwrap().iter() {
                prop_assert!(*o >= base && o + l <= base + size, "{o}+{l} outside [{base}, {})", base + size);
            }
        }
    }

    /// A device in memory: what a view over it does to the bytes is
    /// checked against a model of the disk.
    struct Mem {
        bytes: Mutex<Vec<u8>>,
    }

    impl Mem {
        fn new(size: usize, seed: u8) -> Mem {
            Mem {
                bytes: Mutex::new((0..size).map(|i| (i as u8) ^ seed).collect()),
            }
        }
        fn get(&self) -> Vec<u8> {
            self.bytes.lock().unwrap().clone()
        }
        fn fill(&self, offset: u64, len: u64, byte: u8) {
            let mut b = self.bytes.lock().unwrap();
            b[offset as usize..(offset + len) as usize].fill(byte);
        }
    }

    impl BlockDevice for Mem {
        fn size(&self) -> u64 {
            self.bytes.lock().unwrap().len() as u64
        }
        fn caps(&self) -> Caps {
            Caps {
                writable: true,
                extents: true,
                ..Caps::default()
            }
        }
        fn read(&self, offset: u64, len: usize) -> IoFuture<Bytes> {
            let b = self.bytes.lock().unwrap();
            done(Ok(Bytes::copy_from_slice(
                &b[offset as usize..offset as usize + len],
            )))
        }
        fn read_chunks(&self, offset: u64, len: usize) -> IoFuture<Vec<Chunk>> {
            // Two chunks, the second a hole if it reads as zeros, so the
            // offsets of every chunk are exercised.
            let b = self.bytes.lock().unwrap();
            let half = len / 2;
            let tail = &b[offset as usize + half..offset as usize + len];
            let mut out = vec![Chunk::Data {
                offset,
                data: Bytes::copy_from_slice(&b[offset as usize..offset as usize + half]),
            }];
            out.push(if tail.iter().all(|&x| x == 0) {
                Chunk::Hole {
                    offset: offset + half as u64,
                    length: (len - half) as u64,
                }
            } else {
                Chunk::Data {
                    offset: offset + half as u64,
                    data: Bytes::copy_from_slice(tail),
                }
            });
            done(Ok(out))
        }
        fn write(&self, offset: u64, data: Bytes, _: bool) -> IoFuture<()> {
            let mut b = self.bytes.lock().unwrap();
            b[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
            done(Ok(()))
        }
        fn flush(&self) -> IoFuture<()> {
            done(Ok(()))
        }
        fn trim(&self, offset: u64, len: u64) -> IoFuture<()> {
            self.fill(offset, len, 0);
            done(Ok(()))
        }
        fn write_zeroes(&self, offset: u64, len: u64, _: bool) -> IoFuture<()> {
            self.fill(offset, len, 0);
            done(Ok(()))
        }
        /// Zeros are holes, in runs of 512 bytes.
        fn extents(&self, offset: u64, len: u64) -> IoFuture<Vec<Extent>> {
            let b = self.bytes.lock().unwrap();
            let mut out: Vec<Extent> = Vec::new();
            let mut at = offset;
            while at < offset + len {
                let n = (512 - at % 512).min(offset + len - at);
                let data = b[at as usize..(at + n) as usize].iter().any(|&x| x != 0);
                match out.last_mut() {
                    Some(x) if x.data == data => x.length += n,
                    _ => out.push(Extent {
                        offset: at,
                        length: n,
                        data,
                    }),
                }
                at += n;
            }
            done(Ok(out))
        }
        fn cache(&self, _: u64, _: u64) -> IoFuture<()> {
            done(Ok(()))
        }
    }

    #[test]
    fn a_shadow_map_must_leave_the_disk_alone_and_fit() {
        assert!(matches!(
            ShadowMap::new(4096, 0, 8192),
            Err(RegionError::ShadowLength { .. })
        ));
        assert!(matches!(
            ShadowMap::new(4096, 4096, 8192),
            Err(RegionError::ShadowLength { .. })
        ));
        // The shadow area may not lie inside the disk it shadows.
        assert!(matches!(
            ShadowMap::new(8192, 512, 4096),
            Err(RegionError::ShadowPlace { .. })
        ));
        assert!(matches!(
            ShadowMap::new(8192, 512, u64::MAX - 100),
            Err(RegionError::ShadowPlace { .. })
        ));
        let m = ShadowMap::new(8192, 512, 10_000).unwrap();
        let dev = Arc::new(Mem::new(10_400, 0));
        assert!(matches!(
            Aligned::new(dev, m),
            Err(RegionError::Beyond { end: 10_512, .. })
        ));
    }

    #[test]
    fn a_request_past_the_shadow_is_one_piece_at_its_own_offset() {
        let m = ShadowMap::new(1 << 20, 4096, 2 << 20).unwrap();
        let at = |o, l| m.split(o, l).unwrap().to_vec();
        let p = |disk, at, len| Piece { disk, at, len };
        assert_eq!(at(4096, 512), vec![p(4096, 4096, 512)]);
        assert_eq!(at(0, 512), vec![p(0, 2 << 20, 512)]);
        assert_eq!(
            at(3584, 1024),
            vec![p(3584, (2 << 20) + 3584, 512), p(4096, 4096, 512)]
        );
        assert_eq!(at(100, 0), vec![p(100, (2 << 20) + 100, 0)]);
        assert!(m.split((1 << 20) - 1, 2).is_err());
        assert!(m.split(u64::MAX, 2).is_err());
    }

    #[test]
    fn aligned_extents_report_the_shadow_as_data_and_the_rest_as_below() {
        let dev = Arc::new(Mem::new(16384, 0));
        dev.fill(0, 16384, 0);
        dev.fill(6000, 100, 9);
        let v = Aligned::new(dev, ShadowMap::new(8192, 1024, 12288).unwrap()).unwrap();
        let x = block_on(v.extents(512, 7680)).unwrap();
        let e = |offset, length, data| Extent {
            offset,
            length,
            data,
        };
        assert_eq!(
            x,
            vec![
                e(512, 512, true),
                e(1024, 4608, false),
                e(5632, 512, true),
                e(6144, 2048, false)
            ]
        );
    }

    proptest! {
        /// Whatever a client asks of an aligned view, what reaches the
        /// device below lies in the disk past the shadowed range or in the
        /// shadow area, never in the shadowed range of the device (the
        /// LUN's own GPT and label) nor past the disk; and a request is
        /// refused exactly when it would escape the disk.
        #[test]
        fn nothing_reaches_the_shadowed_range_of_the_device(
            shadow_len in 1u64..(1 << 21), extra in 1u64..(1 << 30), gap in 0u64..(1 << 30),
            offset in any::<u64>(), len in any::<u32>(), near in 0u8..3, op in 0u8..6,
        ) {
            let size = shadow_len + extra;
            let at = size + gap;
            let p = Arc::new(Probe { size: at + shadow_len, ..Default::default() });
            let v = Aligned::new(p.clone(), ShadowMap::new(size, shadow_len, at).unwrap()).unwrap();
            let offset = match near {
                0 => size.saturating_sub(offset % 8192),
                1 => shadow_len.saturating_sub(offset % 8192),
                _ => offset,
            };
            let len = u64::from(len) % (1 << 20);
            let res = match op {
                0 => block_on(v.read(offset, len as usize)).map(drop),
                1 => block_on(v.write(offset, Bytes::from(vec![0u8; len as usize]), false)),
                2 => block_on(v.trim(offset, len)),
                3 => block_on(v.write_zeroes(offset, len, true)),
                4 => block_on(v.extents(offset, len)).map(drop),
                _ => block_on(v.cache(offset, len)),
            };
            let escapes = offset.checked_add(len).is_none_or(|e| e > size);
            prop_assert_eq!(res.is_err(), escapes);
            for (o, l) in p.seen.lock().unwrap().iter() {
                let e = o + l;
                prop_assert!((*o >= shadow_len && e <= size) || (*o >= at && e <= at + shadow_len),
                    "{o}+{l} outside [{shadow_len}, {size}) and [{at}, +{shadow_len})");
            }
        }

        /// An aligned view reads back what was written, like a plain disk,
        /// and stores it where the layout says: disk bytes past the shadowed
        /// range at their own offset, the shadowed range in the shadow area,
        /// and the device's own first bytes untouched.
        #[test]
        fn aligned_view_is_a_disk_whose_start_lives_in_the_shadow_area(
            ops in proptest::collection::vec((0u8..5, 0u64..6144, 0u64..3000, any::<u8>()), 1..40),
        ) {
            const SIZE: u64 = 6144;
            const SHADOW: u64 = 1536;
            const AT: u64 = 7168;
            let dev = Arc::new(Mem::new(9216, 0x5a));
            let original = dev.get();
            let v = Aligned::new(dev.clone(), ShadowMap::new(SIZE, SHADOW, AT).unwrap()).unwrap();
            let mut model: Vec<u8> = (0..SIZE as usize)
                .map(|i| if (i as u64) < SHADOW { original[AT as usize + i] } else { original[i] })
                .collect();
            for (op, off, len, byte) in ops {
                let len = len.min(SIZE - off);
                let r = off as usize..(off + len) as usize;
                match op {
                    0 => {
                        let got = block_on(v.read(off, len as usize)).unwrap();
                        prop_assert_eq!(&got[..], &model[r]);
                    }
                    1 => {
                        let data: Vec<u8> = (0..len).map(|i| byte.wrapping_add(i as u8)).collect();
                        block_on(v.write(off, Bytes::from(data.clone()), true)).unwrap();
                        model[r].copy_from_slice(&data);
                    }
                    2 => {
                        block_on(v.write_zeroes(off, len, byte % 2 == 0)).unwrap();
                        model[r].fill(0);
                    }
                    3 => {
                        let mut got = vec![0u8; len as usize];
                        let mut at = off;
                        for c in block_on(v.read_chunks(off, len as usize)).unwrap() {
                            prop_assert_eq!(c.offset(), at);
                            if let Chunk::Data { offset, data } = &c {
                                got[(offset - off) as usize..(offset - off) as usize + data.len()]
                                    .copy_from_slice(data);
                            }
                            at += c.len();
                        }
                        prop_assert_eq!(at, off + len);
                        prop_assert_eq!(&got[..], &model[r]);
                    }
                    _ => {
                        let mut at = off;
                        for x in block_on(v.extents(off, len)).unwrap() {
                            prop_assert_eq!(x.offset, at);
                            let zeros = model[x.offset as usize..(x.offset + x.length) as usize]
                                .iter().all(|&b| b == 0);
                            prop_assert!(x.data || zeros, "hole over data at {}", x.offset);
                            prop_assert!(x.data || x.offset >= SHADOW, "shadow reported as a hole");
                            at += x.length;
                        }
                        prop_assert_eq!(at, off + len);
                    }
                }
            }
            let now = dev.get();
            prop_assert_eq!(&now[..SHADOW as usize], &original[..SHADOW as usize]);
            prop_assert_eq!(&now[SHADOW as usize..SIZE as usize], &model[SHADOW as usize..]);
            prop_assert_eq!(&now[SIZE as usize..AT as usize], &original[SIZE as usize..AT as usize]);
            prop_assert_eq!(&now[AT as usize..(AT + SHADOW) as usize], &model[..SHADOW as usize]);
            prop_assert_eq!(&now[(AT + SHADOW) as usize..], &original[(AT + SHADOW) as usize..]);
        }
    }
}
