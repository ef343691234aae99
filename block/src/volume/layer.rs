//! One layer of a chain. The base is the raw LUN file (every cluster
//! present at its own offset). A delta is a sparse file with a two-slot
//! header, two journal areas and data clusters; its allocation map lives in
//! memory as a [`Table`] and on disk as the committed journal.
//!
//! Durability of a delta: writes land in data clusters and the in-memory
//! map at once; their journal records wait in `pending`. [`Delta::commit`]
//! makes the data durable (`fdatasync`), appends the records, `fdatasync`,
//! then commits a header naming the new journal length into the other slot,
//! `fdatasync`. A record therefore never points at data that is not on disk,
//! and a crash before the header write leaves the previous map in force.
//! A cluster freed by a zero/trim entry is reused (or punched) only after
//! that entry is committed, so a crash can never resurrect a map entry whose
//! cluster holds someone else's data.
//!
//! Data checksums (a layer made with [`FLAG_CHECKSUMS`]): each commit also
//! journals, after every data entry it writes, a checksum entry with a
//! keyed blake3 of the cluster (keyed by the layer UUID, over the cluster
//! number and its bytes, 62 bits kept), and reads of a summed cluster
//! check the whole cluster before returning any of it. A summed cluster is
//! never written again in place: a write to a cluster committed since
//! the last commit goes in place, any other write copies the cluster to a
//! new physical one (the old one is freed by the next commit as usual), so
//! a checksum always describes bytes that no longer change. A commit
//! hashes each cluster under a try-lock of its shard; a cluster a writer
//! holds at that moment is hashed by the next commit instead (its data is
//! durable all the same; it reads unchecked until then).

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use uuid::Uuid;

use super::error::{corrupt, IoCtx, Result};
use super::header::{Geometry, Header, HeaderError, FLAG_CHECKSUMS, FLAG_FROZEN, HEADER_SIZE};
use super::journal;
use super::table::Table;
use super::{lock, read, write};
use crate::store::{Object, Store};

/// Records waiting for a commit before the writer commits on its own.
pub const PENDING_LIMIT: usize = 1 << 16;

pub enum Layer {
    Raw(Raw),
    Delta(Box<Delta>),
}

impl Layer {
    pub fn id(&self) -> Uuid {
        match self {
            Layer::Raw(r) => r.id,
            Layer::Delta(d) => d.id,
        }
    }

    pub fn path(&self) -> &Path {
        self.object().name()
    }

    /// The store object holding the layer's bytes.
    pub fn object(&self) -> &Arc<dyn Object> {
        match self {
            Layer::Raw(r) => &r.obj,
            Layer::Delta(d) => &d.obj,
        }
    }

    pub fn delta(&self) -> Option<&Delta> {
        match self {
            Layer::Delta(d) => Some(d),
            Layer::Raw(_) => None,
        }
    }

    /// Bytes the layer's files occupy on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.object().stored_bytes()
    }
}

/// A LUN file used as the bottom of a chain.
pub struct Raw {
    pub id: Uuid,
    pub obj: Arc<dyn Object>,
}

struct DeltaState {
    header: Header,
    /// Slot (0 or 1) of the current header.
    slot: u64,
    next_seq: u64,
    next_phys: u64,
    free: Vec<u64>,
    pending_free: Vec<u64>,
    pending: Vec<(u64, u64)>,
    /// Physical clusters from here on were never written in this object
    /// (past its end when opened, never handed out since): they read as
    /// zeros, so a partial write there needs no zero fill.
    fresh_from: u64,
    /// Checksummed layers: clusters whose current physical cluster was
    /// allocated since the last commit took its batch (written in place
    /// until then; any other mapped cluster is copied on write).
    since_commit: HashSet<u64>,
    /// Checksummed layers: data clusters a commit could not hash (a writer
    /// held the shard) or that were found without a checksum at open.
    unsummed: Vec<u64>,
}

/// Checksums of a layer's data clusters: `sum[vc]` is the journal checksum
/// entry, valid while `phys[vc]` (physical cluster + 1) is still where the
/// cluster lives.
struct Sums {
    sum: Table,
    phys: Table,
}

pub struct Delta {
    pub id: Uuid,
    pub obj: Arc<dyn Object>,
    pub geo: Geometry,
    /// Cluster → journal entry value ([`journal::data`] / [`journal::ZERO`]).
    pub map: RwLock<Table>,
    st: Mutex<DeltaState>,
    commit_lock: Mutex<()>,
    /// Whether the layer keeps data checksums ([`FLAG_CHECKSUMS`]).
    checksums: bool,
    /// Key of the cluster checksums (derived from the layer UUID).
    key: [u8; 32],
    sums: RwLock<Sums>,
}

/// A data cluster whose bytes differ from its committed checksum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadCluster {
    pub vc: u64,
    pub phys: u64,
}

fn sum_key(id: Uuid) -> [u8; 32] {
    blake3::derive_key("lungate delta cluster checksum v1", id.as_bytes())
}

/// The 62-bit checksum of cluster `vc` holding `data`.
pub fn cluster_sum(key: &[u8; 32], vc: u64, data: &[u8]) -> u64 {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(&vc.to_le_bytes());
    h.update(data);
    let b = h.finalize();
    u64::from_le_bytes(b.as_bytes()[0..8].try_into().expect("8")) >> 2
}

impl Delta {
    /// Create an empty delta object in `store` (both header slots,
    /// nothing allocated), durable with its name.
    pub fn create(
        store: &dyn Store,
        id: Uuid,
        parent: Uuid,
        lun: Uuid,
        geo: Geometry,
        created: u64,
        checksums: bool,
    ) -> Result<Delta> {
        let header = Header {
            cluster_size: geo.cluster_size as u32,
            generation: 1,
            layer: id,
            parent,
            lun,
            size: geo.size,
            created,
            flags: if checksums { FLAG_CHECKSUMS } else { 0 },
            area: 0,
            journal_len: 0,
            first_seq: 0,
            name: String::new(),
            description: String::new(),
        };
        // Both slots are written: generation 1 in slot 0 and generation 0
        // in slot 1 (where the alternation puts it), so that from the start
        // a zeroed slot is damage, never "not written yet".
        let mut both = header.encode().to_vec();
        both.extend_from_slice(
            &Header {
                generation: 0,
                ..header.clone()
            }
            .encode(),
        );
        let obj = store.create_layer(id, &both, geo.data_start)?;
        Ok(Delta {
            id,
            obj,
            geo,
            map: RwLock::new(Table::new(geo.clusters)),
            st: Mutex::new(DeltaState {
                header,
                slot: 0,
                next_seq: 0,
                next_phys: 0,
                free: Vec::new(),
                pending_free: Vec::new(),
                pending: Vec::new(),
                fresh_from: 0,
                since_commit: HashSet::new(),
                unsummed: Vec::new(),
            }),
            commit_lock: Mutex::new(()),
            checksums,
            key: sum_key(id),
            sums: RwLock::new(Sums {
                sum: Table::new(if checksums { geo.clusters } else { 0 }),
                phys: Table::new(if checksums { geo.clusters } else { 0 }),
            }),
        })
    }

    /// Verify a delta object (opened by the caller from its store) and
    /// replay its committed journal.
    /// Returns warnings (one damaged header slot).
    pub fn open(
        obj: Arc<dyn Object>,
        id: Uuid,
        lun: Uuid,
        geo: Geometry,
    ) -> Result<(Delta, Vec<String>)> {
        let path = obj.name().to_path_buf();
        let len = obj.byte_len().ctx(&path, "stat delta")?;
        // The header slots come first whatever the layer's size.
        let slots = 2 * super::header::HEADER_SIZE as u64;
        if len < slots {
            return Err(corrupt(
                &path,
                format!(
                    "file is {len} bytes, shorter than its two header slots ({slots} bytes): truncated"
                ),
            ));
        }
        let (header, slot, warnings) = read_header(&*obj)?;
        let bad = |why: String| Err(corrupt(&path, why));
        if header.layer != id {
            return bad(format!(
                "header names layer {}, expected {id}",
                header.layer
            ));
        }
        if header.lun != lun {
            return bad(format!("header names LUN {}, expected {lun}", header.lun));
        }
        // A layer made before the volume grew keeps its own, smaller
        // geometry: the clusters past its size are never its (they read
        // through to its parent), so it is opened as it was made.
        let geo = match header.geometry() {
            Some(g) if g.cluster_size == geo.cluster_size && g.size <= geo.size => g,
            _ => {
                return bad(format!(
                    "header geometry (cluster {} size {}) does not fit the volume's (cluster {} size {})",
                    header.cluster_size, header.size, geo.cluster_size, geo.size
                ))
            }
        };
        if len < geo.data_start {
            return Err(corrupt(
                &path,
                format!(
                    "file is {len} bytes, shorter than its headers and journal areas ({} bytes): truncated",
                    geo.data_start
                ),
            ));
        }
        let mut jb = vec![0u8; header.journal_len as usize];
        obj.read_at(&mut jb, geo.area_at(header.area))
            .ctx(&path, "read journal")?;
        // The in-memory index packs a physical cluster into 46 bits.
        let max_phys = ((u64::MAX - geo.data_start) / geo.cluster_size - 1).min((1 << 46) - 1);
        let (entries, next_seq) = journal::decode(&jb, header.first_seq, geo.clusters, max_phys)
            .map_err(|why| corrupt(&path, format!("journal area {}: {why}", header.area)))?;
        let checksums = header.checksums();
        let mut map = Table::new(geo.clusters);
        let mut sums = Sums {
            sum: Table::new(if checksums { geo.clusters } else { 0 }),
            phys: Table::new(if checksums { geo.clusters } else { 0 }),
        };
        for (i, (vc, v)) in entries.into_iter().enumerate() {
            if journal::kind(v) == journal::KIND_SUM {
                let cur = map.get(vc);
                if !checksums || journal::kind(cur) != journal::KIND_DATA {
                    return bad(format!(
                        "journal entry {i}: a checksum for cluster {vc}, which {}",
                        if checksums {
                            "holds no data at that point"
                        } else {
                            "is in a layer made without checksums"
                        }
                    ));
                }
                sums.sum.set(vc, v);
                sums.phys.set(vc, journal::phys(cur) + 1);
                continue;
            }
            if checksums {
                // A new mapping has no checksum until one follows it (the
                // same physical cluster may come back to the cluster).
                sums.sum.set(vc, 0);
                sums.phys.set(vc, 0);
            }
            map.set(vc, v);
        }
        let mut used: Vec<u64> = map
            .iter()
            .filter(|(_, v)| journal::kind(*v) == journal::KIND_DATA)
            .map(|(_, v)| journal::phys(v))
            .collect();
        used.sort_unstable();
        if let Some(w) = used.windows(2).find(|w| w[0] == w[1]) {
            return bad(format!("physical cluster {} is mapped twice", w[0]));
        }
        // Committed data must all be there: a shorter file lost clusters the
        // journal says hold data (they would read as zeros, or as holes once
        // a later write extends the file again).
        let need = map
            .iter()
            .filter(|(_, v)| journal::kind(*v) == journal::KIND_DATA)
            .map(|(vc, v)| {
                let clen = (geo.size - vc * geo.cluster_size).min(geo.cluster_size);
                geo.phys_offset(journal::phys(v)) + clen
            })
            .max()
            .unwrap_or(geo.data_start);
        if len < need {
            return bad(format!(
                "file is {len} bytes but its committed journal maps data up to byte {need}: truncated, committed clusters are missing"
            ));
        }
        let next_phys = used.last().map_or(0, |p| p + 1);
        let mut free = Vec::new();
        let mut it = used.iter().peekable();
        for p in 0..next_phys {
            if it.peek() == Some(&&p) {
                it.next();
            } else {
                free.push(p);
            }
        }
        free.reverse();
        // Data clusters the journal holds without a current checksum (a
        // compaction wrote them before their commit hashed them): the next
        // commit hashes them.
        let unsummed = if checksums {
            map.iter()
                .filter(|&(vc, v)| {
                    journal::kind(v) == journal::KIND_DATA
                        && sums.phys.get(vc) != journal::phys(v) + 1
                })
                .map(|(vc, _)| vc)
                .collect()
        } else {
            Vec::new()
        };
        Ok((
            Delta {
                id,
                obj,
                geo,
                map: RwLock::new(map),
                st: Mutex::new(DeltaState {
                    header,
                    slot,
                    next_seq,
                    next_phys,
                    free,
                    pending_free: Vec::new(),
                    pending: Vec::new(),
                    fresh_from: (len - geo.data_start)
                        .div_ceil(geo.cluster_size)
                        .max(next_phys),
                    since_commit: HashSet::new(),
                    unsummed,
                }),
                commit_lock: Mutex::new(()),
                checksums,
                key: sum_key(id),
                sums: RwLock::new(sums),
            },
            warnings,
        ))
    }

    pub fn header(&self) -> Header {
        lock(&self.st).header.clone()
    }

    /// A physical cluster nobody references.
    pub fn alloc(&self) -> u64 {
        self.alloc_fresh().0
    }

    /// [`Delta::alloc`], and whether the cluster was never written (reads
    /// as zeros without being written).
    pub fn alloc_fresh(&self) -> (u64, bool) {
        let mut st = lock(&self.st);
        let p = match st.free.pop() {
            Some(p) => p,
            None => {
                st.next_phys += 1;
                st.next_phys - 1
            }
        };
        let fresh = p >= st.fresh_from;
        if fresh {
            st.fresh_from = p + 1;
        }
        (p, fresh)
    }

    /// Give back a cluster from [`Delta::alloc`] that was never mapped.
    pub fn unalloc(&self, phys: u64) {
        lock(&self.st).free.push(phys);
    }

    /// Map `vc` to `v` in memory and queue its journal record. A data
    /// cluster it replaces becomes free once the record is committed.
    pub fn set_entry(&self, vc: u64, v: u64) {
        let mut st = lock(&self.st);
        let old = write(&self.map).set(vc, v);
        if journal::kind(old) == journal::KIND_DATA && old != v {
            st.pending_free.push(journal::phys(old));
        }
        if self.checksums {
            if journal::kind(v) == journal::KIND_DATA {
                st.since_commit.insert(vc);
            } else {
                st.since_commit.remove(&vc);
            }
            // The old checksum must not describe the cluster again, should
            // the same physical cluster come back to it after being freed.
            let mut s = write(&self.sums);
            s.sum.set(vc, 0);
            s.phys.set(vc, 0);
        }
        st.pending.push((vc, v));
    }

    /// Whether the layer keeps data checksums.
    pub fn checksums(&self) -> bool {
        self.checksums
    }

    /// Whether a write to cluster `vc`, which this layer maps to data, may
    /// go in place: always without checksums; with them only while the
    /// cluster is not yet summed (see the module docs). The caller holds
    /// the cluster's shard exclusively.
    pub fn in_place_ok(&self, vc: u64) -> bool {
        !self.checksums || lock(&self.st).since_commit.contains(&vc)
    }

    /// The committed checksum of cluster `vc` if it lives at `phys`.
    pub fn sum_for(&self, vc: u64, phys: u64) -> Option<u64> {
        if !self.checksums {
            return None;
        }
        let s = read(&self.sums);
        (s.phys.get(vc) == phys + 1).then(|| s.sum.get(vc) >> 2)
    }

    /// Whether `data` (all of cluster `vc`) matches checksum `sum`.
    pub fn verify(&self, vc: u64, sum: u64, data: &[u8]) -> bool {
        cluster_sum(&self.key, vc, data) == sum
    }

    /// The checksum key (for readers that verify off the layer).
    pub fn sum_key(&self) -> [u8; 32] {
        self.key
    }

    /// Read `buf.len()` bytes of data cluster `vc` at `phys` from `in_off`,
    /// checking the whole cluster (`clen` bytes) against its checksum when
    /// it has one.
    pub fn read_checked(
        &self,
        vc: u64,
        phys: u64,
        clen: usize,
        in_off: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        let Some(sum) = self.sum_for(vc, phys) else {
            return self.read_data(phys, in_off, buf);
        };
        let mut whole = vec![0u8; clen];
        self.read_data(phys, 0, &mut whole)?;
        if !self.verify(vc, sum, &whole) {
            return Err(self.bad_sum(vc, phys));
        }
        buf.copy_from_slice(&whole[in_off as usize..in_off as usize + buf.len()]);
        Ok(())
    }

    pub fn bad_sum(&self, vc: u64, phys: u64) -> super::Error {
        super::Error::DataChecksum {
            path: self.obj.name().to_path_buf(),
            layer: self.id,
            cluster: vc,
            phys,
        }
    }

    /// Summed data clusters `(vc, phys, sum)` and the count of data
    /// clusters without a checksum yet.
    pub fn summed_clusters(&self) -> (Vec<(u64, u64, u64)>, u64) {
        let map = read(&self.map);
        let s = read(&self.sums);
        let mut out = Vec::new();
        let mut unsummed = 0;
        for (vc, v) in map.iter() {
            if journal::kind(v) != journal::KIND_DATA {
                continue;
            }
            let p = journal::phys(v);
            if self.checksums && s.phys.get(vc) == p + 1 {
                out.push((vc, p, s.sum.get(vc) >> 2));
            } else {
                unsummed += 1;
            }
        }
        (out, unsummed)
    }

    pub fn get(&self, vc: u64) -> u64 {
        read(&self.map).get(vc)
    }

    pub fn pending_len(&self) -> usize {
        let st = lock(&self.st);
        st.pending.len() + st.pending_free.len()
    }

    /// Clusters holding data.
    pub fn data_clusters(&self) -> u64 {
        read(&self.map)
            .iter()
            .filter(|(_, v)| journal::kind(*v) == journal::KIND_DATA)
            .count() as u64
    }

    pub fn read_data(&self, phys: u64, in_off: u64, buf: &mut [u8]) -> Result<()> {
        self.obj
            .read_at(buf, self.geo.phys_offset(phys) + in_off)
            .ctx(self.obj.name(), "read delta cluster")
    }

    pub fn write_data(&self, phys: u64, in_off: u64, buf: &[u8]) -> Result<()> {
        self.obj
            .write_at(buf, self.geo.phys_offset(phys) + in_off)
            .ctx(self.obj.name(), "write delta cluster")
    }

    fn write_header(&self, st: &mut DeltaState, h: Header) -> Result<()> {
        let slot = 1 - st.slot;
        self.obj
            .write_at(&h.encode(), slot * HEADER_SIZE as u64)
            .ctx(self.obj.name(), "write delta header")?;
        self.obj
            .sync()
            .ctx(self.obj.name(), "fdatasync delta header")?;
        st.header = h;
        st.slot = slot;
        Ok(())
    }

    /// Make every write so far durable (see the module docs). Only for a
    /// layer no writer can reach meanwhile (tools, tests): a checksummed
    /// layer with live writers commits through [`Delta::commit_guarded`].
    pub fn commit(&self) -> Result<()> {
        self.commit_guarded(|_| Some(()))
    }

    /// [`Delta::commit`] with `try_guard(vc)` giving, when it can without
    /// waiting, a guard under which no writer touches cluster `vc` (its
    /// shard lock): a checksum is computed only under one.
    pub fn commit_guarded<G>(&self, try_guard: impl Fn(u64) -> Option<G>) -> Result<()> {
        let _c = lock(&self.commit_lock);
        let (pending, pfree, header, next_seq, to_hash) = {
            let mut st = lock(&self.st);
            let pending = std::mem::take(&mut st.pending);
            let pfree = std::mem::take(&mut st.pending_free);
            let mut to_hash = Vec::new();
            if self.checksums {
                // From here on no summed-to-be cluster is written in place:
                // writers copy them (see `in_place_ok`).
                st.since_commit.clear();
                let unsummed = std::mem::take(&mut st.unsummed);
                let map = read(&self.map);
                let mut seen = HashSet::new();
                for vc in pending.iter().map(|&(vc, _)| vc).chain(unsummed) {
                    let v = map.get(vc);
                    if seen.insert(vc) && journal::kind(v) == journal::KIND_DATA {
                        to_hash.push((vc, journal::phys(v)));
                    }
                }
            }
            (pending, pfree, st.header.clone(), st.next_seq, to_hash)
        };
        if pending.is_empty() && pfree.is_empty() && to_hash.is_empty() {
            return self.obj.sync().ctx(self.obj.name(), "fdatasync delta");
        }
        let r = self
            .hash_clusters(&to_hash, &try_guard)
            .and_then(|(hashed, deferred)| {
                let entries = self.batch_entries(&pending, &hashed);
                self.commit_batch(&entries, header, next_seq)
                    .map(|done| (done, deferred))
            });
        let mut st = lock(&self.st);
        match r {
            Ok(((h, seq, compacted_from), deferred)) => {
                st.next_seq = seq;
                // `finish` already wrote the other slot; only bookkeeping left.
                st.header = h;
                st.slot = 1 - st.slot;
                st.unsummed.extend(deferred);
                drop(st);
                if let Some(area) = compacted_from {
                    let _ = self
                        .obj
                        .zero_range(self.geo.area_at(area), self.geo.area_len);
                }
                for &p in &pfree {
                    let _ = self
                        .obj
                        .zero_range(self.geo.phys_offset(p), self.geo.cluster_size);
                }
                lock(&self.st).free.extend(pfree);
                Ok(())
            }
            Err(e) => {
                // Keep the batch for the next attempt, ahead of newer records.
                let newer = std::mem::replace(&mut st.pending, pending);
                st.pending.extend(newer);
                st.pending_free.extend(pfree);
                st.unsummed.extend(to_hash.iter().map(|&(vc, _)| vc));
                Err(e)
            }
        }
    }

    /// Checksum the data clusters `(vc, phys)` each under its guard, and
    /// record the sums in memory. Returns `(vc, phys, sum)` for those
    /// hashed and the clusters whose guard was taken (left for the next
    /// commit).
    #[allow(clippy::type_complexity)]
    fn hash_clusters<G>(
        &self,
        to_hash: &[(u64, u64)],
        try_guard: &impl Fn(u64) -> Option<G>,
    ) -> Result<(Vec<(u64, u64, u64)>, Vec<u64>)> {
        let mut hashed = Vec::with_capacity(to_hash.len());
        let mut deferred = Vec::new();
        let mut buf = vec![0u8; self.geo.cluster_size as usize];
        for &(vc, phys) in to_hash {
            let Some(_g) = try_guard(vc) else {
                deferred.push(vc);
                continue;
            };
            let clen = (self.geo.size - vc * self.geo.cluster_size).min(self.geo.cluster_size);
            let b = &mut buf[..clen as usize];
            self.read_data(phys, 0, b)?;
            hashed.push((vc, phys, cluster_sum(&self.key, vc, b)));
        }
        let mut s = write(&self.sums);
        for &(vc, phys, sum) in &hashed {
            s.sum.set(vc, journal::sum_entry(sum));
            s.phys.set(vc, phys + 1);
        }
        Ok((hashed, deferred))
    }

    /// The journal entries of one commit: the last value of each pending
    /// cluster, each data entry followed by its checksum when `hashed` has
    /// it, and the data and checksum entries of clusters hashed only now.
    fn batch_entries(&self, pending: &[(u64, u64)], hashed: &[(u64, u64, u64)]) -> Vec<(u64, u64)> {
        let mut last = std::collections::BTreeMap::new();
        for &(vc, v) in pending {
            last.insert(vc, v);
        }
        let sums: std::collections::HashMap<u64, (u64, u64)> =
            hashed.iter().map(|&(vc, p, s)| (vc, (p, s))).collect();
        for &(vc, p, _) in hashed {
            last.entry(vc).or_insert(journal::data(p));
        }
        let mut out = Vec::with_capacity(last.len() + sums.len());
        for (vc, v) in last {
            out.push((vc, v));
            if journal::kind(v) == journal::KIND_DATA {
                if let Some(&(p, s)) = sums.get(&vc) {
                    if p == journal::phys(v) {
                        out.push((vc, journal::sum_entry(s)));
                    }
                }
            }
        }
        out
    }

    /// Every current map entry with its checksum entry where one is known
    /// (a compacted journal).
    fn all_entries(&self) -> Vec<(u64, u64)> {
        let map = read(&self.map);
        let s = read(&self.sums);
        let mut out = Vec::with_capacity(map.count());
        for (vc, v) in map.iter() {
            out.push((vc, v));
            if self.checksums
                && journal::kind(v) == journal::KIND_DATA
                && s.phys.get(vc) == journal::phys(v) + 1
            {
                out.push((vc, s.sum.get(vc)));
            }
        }
        out
    }

    /// Append (or compact) and commit the header. Returns the new header,
    /// the next sequence number and the area given up by a compaction.
    fn commit_batch(
        &self,
        batch: &[(u64, u64)],
        header: Header,
        seq: u64,
    ) -> Result<(Header, u64, Option<u32>)> {
        let (bytes, next) = journal::encode(batch, seq);
        let mut h = header.clone();
        h.generation = next_generation(self.obj.name(), header.generation)?;
        if header.journal_len + bytes.len() as u64 <= self.geo.area_len {
            self.obj
                .write_at(&bytes, self.geo.area_at(header.area) + header.journal_len)
                .ctx(self.obj.name(), "append journal")?;
            h.journal_len += bytes.len() as u64;
            return self.finish(h, next, None);
        }
        // The map already holds every pending entry: write it whole.
        let all = self.all_entries();
        let (full, next) = journal::encode(&all, seq);
        let area = 1 - header.area;
        self.obj
            .write_at(&full, self.geo.area_at(area))
            .ctx(self.obj.name(), "write compacted journal")?;
        h.area = area;
        h.journal_len = full.len() as u64;
        h.first_seq = seq;
        self.finish(h, next, Some(header.area))
    }

    fn finish(
        &self,
        h: Header,
        next: u64,
        compacted: Option<u32>,
    ) -> Result<(Header, u64, Option<u32>)> {
        self.obj.sync().ctx(self.obj.name(), "fdatasync delta")?;
        let slot = 1 - lock(&self.st).slot;
        self.obj
            .write_at(&h.encode(), slot * HEADER_SIZE as u64)
            .ctx(self.obj.name(), "write delta header")?;
        self.obj
            .sync()
            .ctx(self.obj.name(), "fdatasync delta header")?;
        Ok((h, next, compacted))
    }

    /// Record in the header that the layer is frozen as snapshot `name`
    /// (informational: the manifest is authoritative; `lunctl repair`
    /// rebuilds a lost manifest from it).
    pub fn set_frozen(&self, name: &str, description: &str) -> Result<()> {
        self.update_header(|h| {
            h.flags |= FLAG_FROZEN;
            h.name = truncate(name, super::header::NAME_MAX);
            h.description = truncate(description, super::header::DESC_MAX);
        })
    }

    /// Set or clear the spare flag ([`super::header::FLAG_SPARE`]).
    pub fn set_spare(&self, on: bool) -> Result<()> {
        self.update_header(|h| {
            if on {
                h.flags |= super::header::FLAG_SPARE;
            } else {
                h.flags &= !super::header::FLAG_SPARE;
            }
        })
    }

    /// Record a new parent in the header (after a merge or a flatten
    /// re-parents the layer), so the headers keep naming the tree.
    pub fn set_parent(&self, parent: Uuid) -> Result<()> {
        self.update_header(|h| h.parent = parent)
    }

    /// Commit a new header generation with `f` applied.
    fn update_header(&self, f: impl FnOnce(&mut Header)) -> Result<()> {
        let _c = lock(&self.commit_lock);
        let mut st = lock(&self.st);
        let mut h = st.header.clone();
        h.generation = next_generation(self.obj.name(), h.generation)?;
        f(&mut h);
        self.write_header(&mut st, h)
    }
}

fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// What one header slot of a delta file holds.
enum SlotRead {
    Valid(Header),
    /// Never written (a fresh delta has only slot 0).
    Zero,
    /// Not a valid header; `prefix` is what its first sector still says.
    Damaged {
        why: String,
        prefix: Option<(Uuid, u64)>,
    },
}

fn read_slot(obj: &dyn Object, slot: u64) -> Result<SlotRead> {
    let mut b = vec![0u8; HEADER_SIZE];
    obj.read_at(&mut b, slot * HEADER_SIZE as u64)
        .ctx(obj.name(), "read delta header")?;
    Ok(match Header::decode(&b) {
        Ok(h) => SlotRead::Valid(h),
        Err(HeaderError::NoMagic) if b.iter().all(|&c| c == 0) => SlotRead::Zero,
        Err(e) => SlotRead::Damaged {
            why: e.to_string(),
            prefix: (&b[0..8] == super::header::MAGIC).then(|| {
                let generation = u64::from_le_bytes(b[16..24].try_into().expect("8"));
                (Uuid::from_slice(&b[24..40]).expect("16"), generation)
            }),
        },
    })
}

/// The slot a header of `generation` is written to: generation 1 goes to
/// slot 0 at creation and every later header to the other slot, so the
/// slots alternate and a slot's generation tells which one it must be.
fn slot_of_generation(generation: u64) -> u64 {
    generation.wrapping_sub(1) % 2
}

/// Choose the committed header of a delta file. Falling back to the older
/// slot is legal only where the newer slot is what a torn write of the
/// next header leaves (magic, this layer, generation one above the good
/// slot's or the one it overwrote); anything else — a zeroed slot after
/// the first commit, a slot of the wrong layer or generation, garbage —
/// means committed metadata is missing, and the layer is refused rather
/// than silently read as it was at an older generation.
pub fn read_header(obj: &dyn Object) -> Result<(Header, u64, Vec<String>)> {
    let path = obj.name();
    let slots = [read_slot(obj, 0)?, read_slot(obj, 1)?];
    for (s, r) in slots.iter().enumerate() {
        if let SlotRead::Valid(h) = r {
            if slot_of_generation(h.generation) != s as u64 {
                return Err(corrupt(
                    path,
                    format!(
                        "header slot {s} holds generation {}, which belongs in slot {}: the slots were copied or swapped",
                        h.generation,
                        slot_of_generation(h.generation)
                    ),
                ));
            }
        }
    }
    let pick = match (&slots[0], &slots[1]) {
        (SlotRead::Valid(a), SlotRead::Valid(b)) => {
            if a.layer != b.layer {
                return Err(corrupt(
                    path,
                    format!(
                        "header slots name different layers ({} and {})",
                        a.layer, b.layer
                    ),
                ));
            }
            if a.generation > b.generation {
                0
            } else {
                1
            }
        }
        (SlotRead::Valid(h), SlotRead::Zero) | (SlotRead::Zero, SlotRead::Valid(h)) => {
            // Deltas write both slots at creation; only one made before
            // that, never committed (generation 1, nothing appended to its
            // journal), may still have an unwritten slot.
            if h.generation != 1 || journal_started(obj, h) {
                return Err(corrupt(
                    path,
                    format!(
                        "the other header slot is zeroed but this one holds generation {}: a committed header is missing",
                        h.generation
                    ),
                ));
            }
            if matches!(slots[0], SlotRead::Valid(_)) {
                0
            } else {
                1
            }
        }
        (SlotRead::Valid(h), SlotRead::Damaged { why, prefix })
        | (SlotRead::Damaged { why, prefix }, SlotRead::Valid(h)) => {
            let torn = prefix.is_some_and(|(layer, g)| {
                layer == h.layer
                    && (h.generation.checked_add(1) == Some(g)
                        || g.checked_add(1) == Some(h.generation))
            });
            let good = if matches!(slots[0], SlotRead::Valid(_)) {
                0
            } else {
                1
            };
            if !torn {
                return Err(corrupt(
                    path,
                    format!(
                        "header slot {} is damaged ({why}) and is not a torn write of the header after slot {good}'s generation {}: a committed header may be lost",
                        1 - good,
                        h.generation
                    ),
                ));
            }
            good
        }
        (a, b) => {
            let why = |s: &SlotRead| match s {
                SlotRead::Zero => "zeroed".to_string(),
                SlotRead::Damaged { why, .. } => why.clone(),
                SlotRead::Valid(_) => unreachable!("handled above"),
            };
            return Err(corrupt(
                path,
                format!("no valid header (slot 0: {}; slot 1: {})", why(a), why(b)),
            ));
        }
    };
    let SlotRead::Valid(header) = &slots[pick] else {
        unreachable!("picked a valid slot")
    };
    let mut warnings = Vec::new();
    if let SlotRead::Damaged { why, .. } = &slots[1 - pick] {
        warnings.push(format!(
            "{}: header slot {}: {why} (a torn header write; using slot {pick}, generation {})",
            path.display(),
            1 - pick,
            header.generation
        ));
    }
    Ok((header.clone(), pick as u64, warnings))
}

/// Whether the journal area of `h` has a record at its start (the first
/// step of a commit), or cannot be read.
fn journal_started(obj: &dyn Object, h: &Header) -> bool {
    let Some(geo) = h.geometry() else {
        return true;
    };
    let mut magic = [0u8; 4];
    match obj.read_at(&mut magic, geo.area_at(h.area)) {
        Ok(()) => &magic == journal::MAGIC,
        Err(_) => true,
    }
}

/// Whether the delta `obj` provably holds nothing: no byte written past
/// its two header slots (a crash while [`Delta::create`] wrote them: no
/// journal, no data can be there), or a header of LUN `lun` that never
/// committed a journal record with no byte written past its header and
/// journal areas. Removing such an object loses nothing.
pub fn holds_nothing(obj: &dyn Object, lun: Uuid) -> bool {
    let Ok(len) = obj.byte_len() else {
        return false;
    };
    let hdrs = 2 * HEADER_SIZE as u64;
    if len <= hdrs || obj.data_extents(hdrs, len).is_ok_and(|e| e.is_empty()) {
        return true;
    }
    let Ok((h, _, _)) = read_header(obj) else {
        return false;
    };
    let Some(geo) = h.geometry() else {
        return false;
    };
    h.lun == lun && h.generation <= 1 && h.journal_len == 0 && !h.frozen() && len <= geo.data_start
}

/// Whether `obj` is a spare delta of LUN `lun` ([`super::header::FLAG_SPARE`]):
/// made ahead for a live snapshot whose manifest commit never happened.
pub fn is_spare(obj: &dyn Object, lun: Uuid) -> bool {
    read_header(obj).is_ok_and(|(h, _, _)| h.lun == lun && h.spare())
}

/// The generation after `g`; a header at the last one (which only damage or
/// a crafted file can produce) is refused rather than wrapped.
fn next_generation(path: &Path, g: u64) -> Result<u64> {
    g.checked_add(1)
        .ok_or_else(|| corrupt(path, format!("header generation {g} cannot advance")))
}
