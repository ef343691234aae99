//! The volume's asynchronous data path, and [`VolumeDevice`], the volume
//! as a [`BlockDevice`] in an export's stack.
//!
//! A request resolves its clusters under a short lock (the chain and its
//! merged index never change under it) and then submits the I/O to the
//! store's objects (io_uring on the layer files): reads of mapped clusters
//! and writes into clusters the live layer already holds go straight to
//! the engine. Only allocating a cluster (in memory) and committing the
//! journal (FLUSH, FUA; `fdatasync` and a header write on the blocking
//! pool) are synchronous, and concurrent flushes share one commit.
//!
//! Locks, in the order they are taken:
//! * `io`, shared for the whole request: snapshot and revert take it
//!   exclusively, so the live layer a request planned on is still the live
//!   layer when its I/O lands;
//! * the cluster shards of the range (sorted, each once), shared for reads
//!   and exclusive for writes, held across the I/O: a cluster is allocated
//!   and filled by one writer at a time, and a read never sees a cluster
//!   freed under it and handed to another (trim, flatten and merge take
//!   the same shards);
//! * the state lock, only while planning, never across an await.
//!
//! A copy-on-write of a partly written cluster copies no more than it
//! must: where the data below reads as zeros (a zero entry, an unmapped
//! cluster without a base, or a hole in the base file) and the new cluster
//! was never written, only the new bytes are written; otherwise the rest
//! of the cluster is read from below and the whole cluster written once.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLockReadGuard};

use bytes::{Bytes, BytesMut};
use futures_util::future::try_join_all;

use super::engine::{pack, slot_of, val_of, State, Volume};
use super::journal::{self, KIND_DATA};
use super::{Error, Result};
use crate::device::{done, BlockDevice, Caps, Chunk, Extent, IoFuture};
use crate::store::Object;

/// Where a piece of a request lives.
#[derive(Clone)]
enum Src {
    Zero,
    Obj {
        obj: Arc<dyn Object>,
        at: u64,
    },
    /// Part of a data cluster with a checksum: the whole cluster (`clen`
    /// bytes at `at`) is read and checked, then `in_off..` returned.
    Checked {
        obj: Arc<dyn Object>,
        at: u64,
        clen: u64,
        in_off: u64,
        check: Check,
    },
}

/// What a checked read verifies a cluster against.
#[derive(Clone)]
struct Check {
    vc: u64,
    phys: u64,
    sum: u64,
    key: [u8; 32],
    layer: uuid::Uuid,
}

impl Src {
    /// Read `n` bytes of this source (`None` for zeros).
    async fn read(&self, n: usize) -> Result<Option<Bytes>> {
        match self {
            Src::Zero => Ok(None),
            Src::Obj { obj, at } => obj
                .read(*at, n)
                .await
                .map(Some)
                .map_err(|e| obj_err(obj, e)),
            Src::Checked {
                obj,
                at,
                clen,
                in_off,
                check,
            } => {
                let whole = obj
                    .read(*at, *clen as usize)
                    .await
                    .map_err(|e| obj_err(obj, e))?;
                if super::layer::cluster_sum(&check.key, check.vc, &whole) != check.sum {
                    return Err(Error::DataChecksum {
                        path: obj.name().to_path_buf(),
                        layer: check.layer,
                        cluster: check.vc,
                        phys: check.phys,
                    });
                }
                let o = *in_off as usize;
                Ok(Some(whole.slice(o..o + n)))
            }
        }
    }
}

fn obj_err(obj: &Arc<dyn Object>, e: io::Error) -> Error {
    Error::Io {
        path: obj.name().to_path_buf(),
        op: "read",
        source: e,
    }
}

/// Run `f`, which may block on a lock, without stalling the executor
/// thread when called from a multi-threaded runtime.
fn may_block<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

fn io_err(e: Error) -> io::Error {
    match e {
        Error::Io { source, .. } if source.raw_os_error().is_some() => source,
        Error::Io { .. } => io::Error::other(e),
        Error::OutOfBounds { .. } | Error::Protected { .. } | Error::Invalid(_) => {
            io::Error::new(io::ErrorKind::InvalidInput, e)
        }
        Error::ReadOnly(_) => io::Error::new(io::ErrorKind::PermissionDenied, e),
        // EIO to the client, the cluster and layer in the log.
        other => io::Error::other(other),
    }
}

/// Flush bookkeeping: writes completed and the newest of them known
/// durable, so a flush that finds every write before it already durable
/// (made so by a commit another flush ran) returns at once.
#[derive(Debug, Default)]
pub(super) struct Durability {
    written: AtomicU64,
    durable: AtomicU64,
}

impl Durability {
    /// A write (through either path) completed.
    pub(super) fn note_write(&self) {
        self.written.fetch_add(1, Ordering::AcqRel);
    }
}

impl Volume {
    fn state_shared(&self) -> RwLockReadGuard<'_, State> {
        match self.state.try_read() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            // A tree operation holds it (a merge may copy for a while).
            Err(std::sync::TryLockError::WouldBlock) => may_block(|| super::read(&self.state)),
        }
    }

    /// The distinct shard indices of clusters `[first, last]`, sorted.
    fn shard_ids(&self, first: u64, last: u64) -> Vec<usize> {
        let n = self.shards.len() as u64;
        if last - first + 1 >= n {
            return (0..self.shards.len()).collect();
        }
        let mut v: Vec<usize> = (first..=last).map(|vc| (vc % n) as usize).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Resolve cluster `vc` of the live chain to where its bytes are.
    fn source(&self, st: &State, vc: u64, in_off: u64) -> Src {
        let e = super::read(&st.index).get(vc);
        if e == 0 {
            return match st.root_raw(&st.chain) {
                Some(r) => Src::Obj {
                    obj: r.obj.clone(),
                    at: vc * self.geo.cluster_size + in_off,
                },
                None => Src::Zero,
            };
        }
        let v = val_of(e);
        if journal::kind(v) != KIND_DATA {
            return Src::Zero;
        }
        let phys = journal::phys(v);
        let layer = st.layer(slot_of(e));
        if let Some(d) = layer.delta() {
            if let Some(sum) = d.sum_for(vc, phys) {
                return Src::Checked {
                    obj: d.obj.clone(),
                    // The layer's own geometry: one made before the volume
                    // grew has a smaller one.
                    at: d.geo.phys_offset(phys),
                    clen: self.cluster_len(vc) as u64,
                    in_off,
                    check: Check {
                        vc,
                        phys,
                        sum,
                        key: d.sum_key(),
                        layer: d.id,
                    },
                };
            }
        }
        let geo = layer.delta().map_or(self.geo, |d| d.geo);
        Src::Obj {
            obj: layer.object().clone(),
            at: geo.phys_offset(phys) + in_off,
        }
    }

    /// Pieces `(start, len, source)` of `[offset, offset + len)`, adjacent
    /// pieces from one object at contiguous offsets (and zero pieces)
    /// merged.
    fn plan_read(&self, st: &State, offset: u64, len: u64) -> Vec<(u64, u64, Src)> {
        let mut out: Vec<(u64, u64, Src)> = Vec::new();
        for (vc, in_off, ps, pe) in self.pieces(offset, offset + len) {
            let src = self.source(st, vc, in_off);
            let n = pe - ps;
            if let Some((_, l, last)) = out.last_mut() {
                let joins = match (&*last, &src) {
                    (Src::Zero, Src::Zero) => true,
                    (Src::Obj { obj: a, at: x }, Src::Obj { obj: b, at: y }) => {
                        Arc::ptr_eq(a, b) && *x + *l == *y
                    }
                    _ => false,
                };
                if joins {
                    *l += n;
                    continue;
                }
            }
            out.push((ps, n, src));
        }
        out
    }

    /// Read `len` bytes at `offset` of the live volume. In range by the
    /// caller's check (the region view above).
    pub async fn read_async(self: Arc<Self>, offset: u64, len: usize) -> Result<Bytes> {
        debug_assert!(offset + len as u64 <= self.geo.size);
        if len == 0 {
            return Ok(Bytes::new());
        }
        let _io = self.io.read().await;
        let cs = self.geo.cluster_size;
        let mut guards = Vec::new();
        for i in self.shard_ids(offset / cs, (offset + len as u64 - 1) / cs) {
            guards.push(self.shards[i].read().await);
        }
        let plan = {
            let st = self.state_shared();
            self.plan_read(&st, offset, len as u64)
        };
        if let [(_, _, src)] = plan.as_slice() {
            return Ok(src
                .read(len)
                .await?
                .unwrap_or_else(|| Bytes::from(vec![0u8; len])));
        }
        let reads = plan.iter().map(|(start, n, src)| {
            let (start, n) = (*start, *n);
            async move { src.read(n as usize).await.map(|b| (start, n, b)) }
        });
        let parts = try_join_all(reads).await?;
        let mut buf = BytesMut::zeroed(len);
        for (start, n, data) in parts {
            if let Some(d) = data {
                let at = (start - offset) as usize;
                buf[at..at + n as usize].copy_from_slice(&d);
            }
        }
        Ok(buf.freeze())
    }

    /// [`BlockDevice::read_chunks`]: zero clusters and holes of the base
    /// come back as holes without being read.
    pub async fn read_chunks_async(self: Arc<Self>, offset: u64, len: usize) -> Result<Vec<Chunk>> {
        if len == 0 {
            return Ok(vec![]);
        }
        let _io = self.io.read().await;
        let cs = self.geo.cluster_size;
        let mut guards = Vec::new();
        for i in self.shard_ids(offset / cs, (offset + len as u64 - 1) / cs) {
            guards.push(self.shards[i].read().await);
        }
        let (plan, base) = {
            let st = self.state_shared();
            let base = st.root_raw(&st.chain).map(|r| r.obj.clone());
            (self.plan_read(&st, offset, len as u64), base)
        };
        // Split pieces read from the base at its holes.
        let mut pieces: Vec<(u64, u64, Src)> = Vec::new();
        for (start, n, src) in plan {
            match &src {
                Src::Obj { obj, at } if base.as_ref().is_some_and(|b| Arc::ptr_eq(b, obj)) => {
                    let data = obj
                        .data_extents(*at, *at + n)
                        .map_err(|e| self.ioe(e, "SEEK_DATA"))?;
                    let mut pos = *at;
                    for (o, l) in data {
                        if o > pos {
                            pieces.push((start + (pos - at), o - pos, Src::Zero));
                        }
                        pieces.push((
                            start + (o - at),
                            l,
                            Src::Obj {
                                obj: obj.clone(),
                                at: o,
                            },
                        ));
                        pos = o + l;
                    }
                    if pos < at + n {
                        pieces.push((start + (pos - at), at + n - pos, Src::Zero));
                    }
                }
                _ => pieces.push((start, n, src)),
            }
        }
        let reads = pieces.into_iter().map(|(start, n, src)| async move {
            Ok::<_, Error>(match src.read(n as usize).await? {
                Some(data) => Chunk::Data {
                    offset: start,
                    data,
                },
                None => Chunk::Hole {
                    offset: start,
                    length: n,
                },
            })
        });
        let mut chunks: Vec<Chunk> = Vec::new();
        for c in try_join_all(reads).await? {
            match (chunks.last_mut(), &c) {
                (Some(Chunk::Hole { length, .. }), Chunk::Hole { length: more, .. }) => {
                    *length += more
                }
                _ => chunks.push(c),
            }
        }
        Ok(chunks)
    }

    /// Write `data` at `offset` of the live volume; with `fua`, durable
    /// (journal committed) before returning.
    pub async fn write_async(self: Arc<Self>, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        self.writable()?;
        debug_assert!(offset + data.len() as u64 <= self.geo.size);
        if !data.is_empty() {
            self.clone()
                .write_locked(offset, WriteData::Bytes(data))
                .await?;
        }
        if fua {
            self.flush_async().await?;
        }
        Ok(())
    }

    /// Make `[offset, offset + len)` read as zeros; `may_trim` lets whole
    /// clusters be deallocated (a zero entry) instead of written.
    pub async fn write_zeroes_async(
        self: Arc<Self>,
        offset: u64,
        len: u64,
        may_trim: bool,
    ) -> Result<()> {
        self.writable()?;
        if len == 0 {
            return Ok(());
        }
        self.write_locked(offset, WriteData::Zeros { len, may_trim })
            .await
    }

    async fn write_locked(self: Arc<Self>, offset: u64, data: WriteData) -> Result<()> {
        let len = data.len();
        let _io = self.io.read().await;
        let cs = self.geo.cluster_size;
        let mut guards = Vec::new();
        for i in self.shard_ids(offset / cs, (offset + len - 1) / cs) {
            guards.push(self.shards[i].write().await);
        }
        // Plan: in-place targets, and clusters the live layer must allocate.
        let (ops, top) = {
            let st = self.state_shared();
            let top = st.top;
            let top_raw = st.layer(top).delta().is_none();
            let mut ops: Vec<WriteOp> = Vec::new();
            for (vc, in_off, ps, pe) in self.pieces(offset, offset + len) {
                let n = pe - ps;
                let slice = (ps - offset, n);
                if top_raw {
                    // A plain volume: the LUN file is the live layer.
                    ops.push(WriteOp::InPlace {
                        obj: st.layer(top).object().clone(),
                        at: ps,
                        slice,
                    });
                    continue;
                }
                let d = st.delta(top);
                let clen = self.cluster_len(vc) as u64;
                if let WriteData::Zeros { may_trim: true, .. } = data {
                    if in_off == 0 && n == clen {
                        ops.push(WriteOp::ZeroEntry { vc });
                        continue;
                    }
                }
                let e = super::read(&st.index).get(vc);
                if e != 0
                    && slot_of(e) == top
                    && journal::kind(val_of(e)) == KIND_DATA
                    && d.in_place_ok(vc)
                {
                    ops.push(WriteOp::InPlace {
                        obj: d.obj.clone(),
                        at: d.geo.phys_offset(journal::phys(val_of(e))) + in_off,
                        slice,
                    });
                    continue;
                }
                let (p, fresh) = d.alloc_fresh();
                let below = if in_off == 0 && n == clen {
                    None
                } else {
                    Some(self.source(&st, vc, 0))
                };
                ops.push(WriteOp::Alloc {
                    vc,
                    p,
                    fresh,
                    in_off,
                    clen,
                    below,
                    slice,
                });
            }
            (ops, top)
        };
        let obj_top = self.state_shared().layer(top).object().clone();
        let run = ops
            .iter()
            .map(|op| self.clone().run_write(op, &data, &obj_top));
        let result = try_join_all(run).await;
        // Map what was written (or give back what was not).
        let mut first_err = result.err();
        {
            let st = self.state_shared();
            for op in &ops {
                match op {
                    WriteOp::Alloc { vc, p, .. } => {
                        let d = st.delta(top);
                        if first_err.is_some() {
                            // Not handed out again: its bytes are unknown now.
                            continue;
                        }
                        d.set_entry(*vc, journal::data(*p));
                        super::write(&st.index).set(*vc, pack(top, journal::data(*p)));
                    }
                    WriteOp::ZeroEntry { vc } if first_err.is_none() => {
                        let mut idx = super::write(&st.index);
                        let e = idx.get(*vc);
                        let reads_zero = if e == 0 {
                            st.root_raw(&st.chain).is_none()
                        } else {
                            journal::kind(val_of(e)) != KIND_DATA
                        };
                        if !reads_zero {
                            st.delta(top).set_entry(*vc, journal::ZERO);
                            idx.set(*vc, pack(top, journal::ZERO));
                        }
                    }
                    _ => {}
                }
            }
        }
        drop(guards);
        // Marked once the bytes landed: a tracker taken meanwhile finds them
        // in its next take.
        self.mark_dirty(offset, len);
        self.durability.note_write();
        if let Some(e) = first_err.take() {
            return Err(self.ioe(e, "write"));
        }
        drop(_io);
        self.clone().maybe_commit_async().await
    }

    /// One planned write; `top` is the live layer's object.
    async fn run_write(
        self: Arc<Self>,
        op: &WriteOp,
        data: &WriteData,
        top: &Arc<dyn Object>,
    ) -> io::Result<()> {
        match op {
            WriteOp::ZeroEntry { .. } => Ok(()),
            WriteOp::InPlace { obj, at, slice } => match data {
                WriteData::Bytes(b) => {
                    let (s, n) = (slice.0 as usize, slice.1 as usize);
                    obj.write(*at, b.slice(s..s + n), false).await
                }
                WriteData::Zeros { may_trim, .. } => {
                    obj.write_zeroes(*at, slice.1, *may_trim).await
                }
            },
            WriteOp::Alloc {
                p,
                fresh,
                in_off,
                clen,
                below,
                slice,
                ..
            } => {
                let at = self.geo.phys_offset(*p);
                let (s, n) = (slice.0 as usize, slice.1 as usize);
                let new: Bytes = match data {
                    WriteData::Bytes(b) => b.slice(s..s + n),
                    WriteData::Zeros { .. } => Bytes::from(vec![0u8; n]),
                };
                let Some(below) = below else {
                    return top.write(at, new, false).await;
                };
                let below_zero = match below {
                    Src::Zero => true,
                    Src::Obj { obj, at } => {
                        // A hole below reads as zeros too.
                        Arc::ptr_eq(obj, self.store.base())
                            && obj
                                .data_extents(*at, *at + clen)
                                .is_ok_and(|d| d.is_empty())
                    }
                    Src::Checked { .. } => false,
                };
                if below_zero && *fresh {
                    // The new cluster already reads as zeros around `new`;
                    // only its length must reach the cluster's end (its
                    // last byte, a zero, is written when `new` stops short).
                    let end = at + clen;
                    let head = match data {
                        WriteData::Zeros { .. } => None,
                        WriteData::Bytes(_) => Some(top.write(at + in_off, new, false)),
                    };
                    // Zeros write nothing at all, so they always need the
                    // last byte; data reaching the cluster's end does not.
                    let tail = (head.is_none() || *in_off + (n as u64) < *clen)
                        .then(|| top.write(end - 1, Bytes::from_static(&[0]), false));
                    if let Some(h) = head {
                        h.await?;
                    }
                    if let Some(t) = tail {
                        t.await?;
                    }
                    return Ok(());
                }
                let mut cluster = BytesMut::zeroed(*clen as usize);
                if !below_zero {
                    // A checked source is verified before its bytes are
                    // copied up (and summed again there).
                    if let Some(old) = below.read(*clen as usize).await.map_err(io_err)? {
                        cluster.copy_from_slice(&old);
                    }
                }
                let o = *in_off as usize;
                cluster[o..o + n].copy_from_slice(&new);
                top.write(at, cluster.freeze(), false).await
            }
        }
    }

    async fn maybe_commit_async(self: Arc<Self>) -> Result<()> {
        let pending = {
            let st = self.state_shared();
            st.layer(st.top)
                .delta()
                .is_some_and(|d| d.pending_len() > super::layer::PENDING_LIMIT)
        };
        if pending {
            self.flush_async().await?;
        }
        Ok(())
    }

    /// Every write completed before this call is durable when it returns.
    /// Flushes that overlap share commits: one that finds its writes made
    /// durable by another's commit returns without committing again.
    pub async fn flush_async(self: Arc<Self>) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let target = self.durability.written.load(Ordering::Acquire);
        if self.durability.durable.load(Ordering::Acquire) >= target && target > 0 {
            return Ok(());
        }
        let _io = self.io.read().await;
        let top_obj = {
            let st = self.state_shared();
            st.layer(st.top)
                .delta()
                .is_none()
                .then(|| st.layer(st.top).object().clone())
        };
        match top_obj {
            // A plain volume: an fdatasync of the LUN file, on the engine.
            Some(obj) => {
                obj.flush().await.map_err(|e| self.ioe(e, "fdatasync"))?;
                self.durability.durable.fetch_max(target, Ordering::AcqRel);
                Ok(())
            }
            None => {
                let v = self.clone();
                tokio::task::spawn_blocking(move || {
                    let _c = super::lock(&v.commit_group);
                    if v.durability.durable.load(Ordering::Acquire) >= target && target > 0 {
                        return Ok(());
                    }
                    let now = v.durability.written.load(Ordering::Acquire);
                    loop {
                        let st = super::read(&v.state);
                        // Writes before a snapshot's switch went to the
                        // layer it froze: its commit comes first.
                        if !v.switch_pending.load(Ordering::Acquire) {
                            v.commit_layer(st.delta(st.top))?;
                            break;
                        }
                        drop(st);
                        v.finish_switch()?;
                    }
                    v.durability.durable.fetch_max(now, Ordering::AcqRel);
                    Ok(())
                })
                .await
                .map_err(|e| Error::Invalid(format!("flush task failed: {e}")))?
            }
        }
    }

    /// [`Volume::extents`] from an asynchronous context.
    pub fn extents_async(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        may_block(|| self.extents(offset, len))
    }

    /// Ask the layer holding each cluster of the range to read it ahead.
    pub fn cache_async(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let st = self.state_shared();
        for (_, n, src) in self.plan_read(&st, offset, len) {
            match src {
                Src::Obj { obj, at } => obj.will_need(at, n),
                Src::Checked { obj, at, clen, .. } => obj.will_need(at, clen),
                Src::Zero => {}
            }
        }
        Ok(())
    }

    fn ioe(&self, e: io::Error, op: &'static str) -> Error {
        Error::Io {
            path: self.lun_path.clone(),
            op,
            source: e,
        }
    }
}

enum WriteData {
    Bytes(Bytes),
    Zeros { len: u64, may_trim: bool },
}

impl WriteData {
    fn len(&self) -> u64 {
        match self {
            WriteData::Bytes(b) => b.len() as u64,
            WriteData::Zeros { len, .. } => *len,
        }
    }
}

enum WriteOp {
    /// Overwrite bytes the live layer already holds (or the LUN file of a
    /// plain volume): `slice` is `(start, len)` within the request.
    InPlace {
        obj: Arc<dyn Object>,
        at: u64,
        slice: (u64, u64),
    },
    /// A whole cluster made to read as zeros by a zero entry.
    ZeroEntry { vc: u64 },
    /// A new physical cluster `p` of the live layer for cluster `vc`;
    /// `below` is what the cluster read before (for a partial write).
    Alloc {
        vc: u64,
        p: u64,
        fresh: bool,
        in_off: u64,
        clen: u64,
        below: Option<Src>,
        slice: (u64, u64),
    },
}

/// The volume as a [`BlockDevice`]: the layer of an export's stack below
/// the live-switch gate.
#[derive(Clone)]
pub struct VolumeDevice {
    vol: Arc<Volume>,
}

impl VolumeDevice {
    pub fn new(vol: Arc<Volume>) -> VolumeDevice {
        VolumeDevice { vol }
    }
    pub fn volume(&self) -> &Arc<Volume> {
        &self.vol
    }
}

impl BlockDevice for VolumeDevice {
    fn size(&self) -> u64 {
        self.vol.size()
    }

    fn caps(&self) -> Caps {
        Caps {
            writable: !self.vol.is_read_only(),
            flush: true,
            trim: true,
            fast_zero: true,
            extents: true,
        }
    }

    fn read(&self, offset: u64, len: usize) -> IoFuture<Bytes> {
        let v = self.vol.clone();
        Box::pin(async move { v.read_async(offset, len).await.map_err(io_err) })
    }

    fn read_chunks(&self, offset: u64, len: usize) -> IoFuture<Vec<Chunk>> {
        let v = self.vol.clone();
        Box::pin(async move { v.read_chunks_async(offset, len).await.map_err(io_err) })
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> IoFuture<()> {
        let v = self.vol.clone();
        Box::pin(async move { v.write_async(offset, data, fua).await.map_err(io_err) })
    }

    fn flush(&self) -> IoFuture<()> {
        let v = self.vol.clone();
        Box::pin(async move { v.flush_async().await.map_err(io_err) })
    }

    fn trim(&self, offset: u64, len: u64) -> IoFuture<()> {
        let v = self.vol.clone();
        Box::pin(async move {
            v.write_zeroes_async(offset, len, true)
                .await
                .map_err(io_err)
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> IoFuture<()> {
        let v = self.vol.clone();
        Box::pin(async move {
            v.write_zeroes_async(offset, len, may_trim)
                .await
                .map_err(io_err)
        })
    }

    fn extents(&self, offset: u64, len: u64) -> IoFuture<Vec<Extent>> {
        done(self.vol.extents_async(offset, len).map_err(io_err))
    }

    fn cache(&self, offset: u64, len: u64) -> IoFuture<()> {
        done(self.vol.cache_async(offset, len).map_err(io_err))
    }

    fn changed_since(
        &self,
        snapshot: &str,
        offset: u64,
        len: u64,
    ) -> IoFuture<Vec<std::ops::Range<u64>>> {
        // Index lookups under the state lock, no I/O: answered at call time.
        done(
            self.vol
                .changed_since(snapshot, offset, len)
                .map_err(|e| match e {
                    Error::NoSnapshot(_) => io::Error::new(io::ErrorKind::NotFound, e),
                    e => io_err(e),
                }),
        )
    }
}
