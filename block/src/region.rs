//! The region view: one disk region of a LUN as a device of its own, the
//! top of an export's stack.
//!
//! A [`Region`] shows `[base, base + size)` of the device below as
//! `[0, size)`. That covers both of lungate's layouts: *offset* (the disk
//! lies after the GPT, `base > 0`) and *truncate* (the disk starts at byte
//! 0 and the state region and footer lie past `size`). Every request range
//! is checked here, once, with checked arithmetic, against `size`, before
//! `base` is added; so nothing outside the region is ever read, written,
//! trimmed, queried or cached, whatever a client sends. Layers below only
//! translate.

use std::io;
use std::sync::Arc;

use bytes::Bytes;

use crate::device::{check_range, done, BlockDevice, Caps, Chunk, Extent, IoFuture, RangeError};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegionError {
    #[error("region offset {base} + length {size} overflows 64 bits")]
    Overflow { base: u64, size: u64 },
    #[error("region [{base}, {end}) lies beyond the device's {device} bytes")]
    Beyond { base: u64, end: u64, device: u64 },
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

    /// Device extents mapped back to region offsets, clipped to
    /// `[offset, offset + len)`, gaps filled as data.
    fn map_back(&self, raw: Vec<Extent>, offset: u64, len: u64) -> Vec<Extent> {
        let end = offset + len;
        let mut out: Vec<Extent> = Vec::new();
        let mut push = |o: u64, l: u64, data: bool| match out.last_mut() {
            Some(x) if x.data == data && x.offset + x.length == o => x.length += l,
            _ => out.push(Extent {
                offset: o,
                length: l,
                data,
            }),
        };
        let mut pos = offset;
        for x in raw {
            let Some(x_end) = x.offset.checked_add(x.length) else {
                continue;
            };
            let lo = x.offset.saturating_sub(self.base).max(pos);
            let hi = x_end.saturating_sub(self.base).min(end);
            if hi <= lo {
                continue;
            }
            if lo > pos {
                push(pos, lo - pos, true);
            }
            push(lo, hi - lo, x.data);
            pos = hi;
        }
        if pos < end {
            push(pos, end - pos, true);
        }
        out
    }
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
        let base = self.base;
        Box::pin(async move {
            Ok(f.await?
                .into_iter()
                .map(|c| match c {
                    Chunk::Data { offset, data } => Chunk::Data {
                        offset: offset - base,
                        data,
                    },
                    Chunk::Hole { offset, length } => Chunk::Hole {
                        offset: offset - base,
                        length,
                    },
                })
                .collect())
        })
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
        let me = Region {
            inner: self.inner.clone(),
            base: self.base,
            size: self.size,
        };
        Box::pin(async move { Ok(me.map_back(f.await?, offset, len)) })
    }

    fn cache(&self, offset: u64, len: u64) -> IoFuture<()> {
        match self.at(offset, len) {
            Ok(at) => self.inner.cache(at, len),
            Err(e) => refuse(e),
        }
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
}
