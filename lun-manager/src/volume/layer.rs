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

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

use uuid::Uuid;

use super::error::{corrupt, IoCtx, Result};
use super::header::{Geometry, Header, HeaderError, FLAG_FROZEN, HEADER_SIZE};
use super::journal;
use super::manifest::create_file;
use super::table::Table;
use super::{lock, read, write};

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
        match self {
            Layer::Raw(r) => &r.path,
            Layer::Delta(d) => &d.path,
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
        let f = match self {
            Layer::Raw(r) => &*r.file,
            Layer::Delta(d) => &d.file,
        };
        f.metadata().map(|m| m.blocks() * 512).unwrap_or(0)
    }
}

/// A LUN file used as the bottom of a chain.
pub struct Raw {
    pub id: Uuid,
    pub path: PathBuf,
    pub file: std::sync::Arc<File>,
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
}

pub struct Delta {
    pub id: Uuid,
    pub path: PathBuf,
    pub file: File,
    pub geo: Geometry,
    /// Cluster → journal entry value ([`journal::data`] / [`journal::ZERO`]).
    pub map: RwLock<Table>,
    st: Mutex<DeltaState>,
    commit_lock: Mutex<()>,
}

pub fn delta_path(dir: &Path, id: Uuid) -> PathBuf {
    dir.join(format!("{id}.delta"))
}

impl Delta {
    /// Create an empty delta file (header in slot 0, nothing allocated).
    /// The caller makes the directory entry durable.
    pub fn create(
        dir: &Path,
        id: Uuid,
        parent: Uuid,
        lun: Uuid,
        geo: Geometry,
        created: u64,
    ) -> Result<Delta> {
        let header = Header {
            cluster_size: geo.cluster_size as u32,
            generation: 1,
            layer: id,
            parent,
            lun,
            size: geo.size,
            created,
            flags: 0,
            area: 0,
            journal_len: 0,
            first_seq: 0,
            name: String::new(),
            description: String::new(),
        };
        let path = delta_path(dir, id);
        let file = create_file(&path, &header.encode())?;
        file.set_len(geo.data_start).ctx(&path, "size delta file")?;
        file.sync_all().ctx(&path, "fsync delta file")?;
        Ok(Delta {
            id,
            path,
            file,
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
            }),
            commit_lock: Mutex::new(()),
        })
    }

    /// Open and verify a delta file, replaying its committed journal.
    /// Returns warnings (one damaged header slot).
    pub fn open(
        dir: &Path,
        id: Uuid,
        lun: Uuid,
        geo: Geometry,
        writable: bool,
    ) -> Result<(Delta, Vec<String>)> {
        let path = delta_path(dir, id);
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(&path)
            .ctx(&path, "open delta")?;
        let mut best: Option<(Header, u64)> = None;
        let mut problems = Vec::new();
        for slot in 0..2u64 {
            let mut b = vec![0u8; HEADER_SIZE];
            if let Err(e) = file.read_exact_at(&mut b, slot * HEADER_SIZE as u64) {
                problems.push(format!("header slot {slot}: {e}"));
                continue;
            }
            match Header::decode(&b) {
                Ok(h) => {
                    if best
                        .as_ref()
                        .is_none_or(|(x, _)| h.generation > x.generation)
                    {
                        best = Some((h, slot));
                    }
                }
                Err(HeaderError::NoMagic) if b.iter().all(|&c| c == 0) => {}
                Err(e) => problems.push(format!("header slot {slot}: {e}")),
            }
        }
        let Some((header, slot)) = best else {
            return Err(corrupt(
                &path,
                format!("no valid header ({})", problems.join("; ")),
            ));
        };
        let mut warnings = Vec::new();
        for p in &problems {
            warnings.push(format!(
                "{}: {p} (using slot {slot}, generation {})",
                path.display(),
                header.generation
            ));
        }
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
        if header.geometry() != Some(geo) {
            return bad(format!(
                "header geometry (cluster {} size {}) differs from the volume's (cluster {} size {})",
                header.cluster_size, header.size, geo.cluster_size, geo.size
            ));
        }
        let mut jb = vec![0u8; header.journal_len as usize];
        file.read_exact_at(&mut jb, geo.area_at(header.area))
            .ctx(&path, "read journal")?;
        // The in-memory index packs a physical cluster into 46 bits.
        let max_phys = ((u64::MAX - geo.data_start) / geo.cluster_size - 1).min((1 << 46) - 1);
        let (entries, next_seq) = journal::decode(&jb, header.first_seq, geo.clusters, max_phys)
            .map_err(|why| corrupt(&path, format!("journal area {}: {why}", header.area)))?;
        let mut map = Table::new(geo.clusters);
        for (vc, v) in entries {
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
        Ok((
            Delta {
                id,
                path,
                file,
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
                }),
                commit_lock: Mutex::new(()),
            },
            warnings,
        ))
    }

    pub fn header(&self) -> Header {
        lock(&self.st).header.clone()
    }

    /// A physical cluster nobody references.
    pub fn alloc(&self) -> u64 {
        let mut st = lock(&self.st);
        match st.free.pop() {
            Some(p) => p,
            None => {
                st.next_phys += 1;
                st.next_phys - 1
            }
        }
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
        st.pending.push((vc, v));
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
        self.file
            .read_exact_at(buf, self.geo.phys_offset(phys) + in_off)
            .ctx(&self.path, "read delta cluster")
    }

    pub fn write_data(&self, phys: u64, in_off: u64, buf: &[u8]) -> Result<()> {
        self.file
            .write_all_at(buf, self.geo.phys_offset(phys) + in_off)
            .ctx(&self.path, "write delta cluster")
    }

    fn write_header(&self, st: &mut DeltaState, h: Header) -> Result<()> {
        let slot = 1 - st.slot;
        self.file
            .write_all_at(&h.encode(), slot * HEADER_SIZE as u64)
            .ctx(&self.path, "write delta header")?;
        self.file
            .sync_data()
            .ctx(&self.path, "fdatasync delta header")?;
        st.header = h;
        st.slot = slot;
        Ok(())
    }

    /// Make every write so far durable (see the module docs).
    pub fn commit(&self) -> Result<()> {
        let _c = lock(&self.commit_lock);
        let (pending, pfree, header, next_seq) = {
            let mut st = lock(&self.st);
            (
                std::mem::take(&mut st.pending),
                std::mem::take(&mut st.pending_free),
                st.header.clone(),
                st.next_seq,
            )
        };
        if pending.is_empty() && pfree.is_empty() {
            return self.file.sync_data().ctx(&self.path, "fdatasync delta");
        }
        let r = self.commit_batch(&pending, header, next_seq);
        let mut st = lock(&self.st);
        match r {
            Ok((h, seq, compacted_from)) => {
                st.next_seq = seq;
                // `write_header` below already switched; only bookkeeping left.
                st.header = h;
                st.slot = 1 - st.slot;
                drop(st);
                if let Some(area) = compacted_from {
                    let _ = crate::fileops::zero_range(
                        &self.file,
                        self.geo.area_at(area),
                        self.geo.area_len,
                    );
                }
                for &p in &pfree {
                    let _ = crate::fileops::zero_range(
                        &self.file,
                        self.geo.phys_offset(p),
                        self.geo.cluster_size,
                    );
                }
                lock(&self.st).free.extend(pfree);
                Ok(())
            }
            Err(e) => {
                // Keep the batch for the next attempt, ahead of newer records.
                let newer = std::mem::replace(&mut st.pending, pending);
                st.pending.extend(newer);
                st.pending_free.extend(pfree);
                Err(e)
            }
        }
    }

    /// Append (or compact) and commit the header. Returns the new header,
    /// the next sequence number and the area given up by a compaction.
    fn commit_batch(
        &self,
        pending: &[(u64, u64)],
        header: Header,
        seq: u64,
    ) -> Result<(Header, u64, Option<u32>)> {
        let mut last = std::collections::HashMap::with_capacity(pending.len());
        for &(vc, v) in pending {
            last.insert(vc, v);
        }
        let mut batch: Vec<(u64, u64)> = last.into_iter().collect();
        batch.sort_unstable();
        let (bytes, next) = journal::encode(&batch, seq);
        let mut h = header.clone();
        h.generation += 1;
        let mut compacted = None;
        if header.journal_len + bytes.len() as u64 <= self.geo.area_len {
            self.file
                .write_all_at(&bytes, self.geo.area_at(header.area) + header.journal_len)
                .ctx(&self.path, "append journal")?;
            h.journal_len += bytes.len() as u64;
        } else {
            // The map already holds every pending entry: write it whole.
            let all: Vec<(u64, u64)> = read(&self.map).iter().collect();
            let (full, _) = journal::encode(&all, seq);
            let area = 1 - header.area;
            self.file
                .write_all_at(&full, self.geo.area_at(area))
                .ctx(&self.path, "write compacted journal")?;
            h.area = area;
            h.journal_len = full.len() as u64;
            h.first_seq = seq;
            compacted = Some(header.area);
            let next = seq + all.len().div_ceil(journal::MAX_PER_RECORD) as u64;
            return self.finish(h, next, compacted);
        }
        self.finish(h, next, compacted)
    }

    fn finish(
        &self,
        h: Header,
        next: u64,
        compacted: Option<u32>,
    ) -> Result<(Header, u64, Option<u32>)> {
        self.file.sync_data().ctx(&self.path, "fdatasync delta")?;
        let slot = 1 - lock(&self.st).slot;
        self.file
            .write_all_at(&h.encode(), slot * HEADER_SIZE as u64)
            .ctx(&self.path, "write delta header")?;
        self.file
            .sync_data()
            .ctx(&self.path, "fdatasync delta header")?;
        Ok((h, next, compacted))
    }

    /// Record in the header that the layer is frozen as snapshot `name`
    /// (informational: the manifest is authoritative).
    pub fn set_frozen(&self, name: &str, description: &str) -> Result<()> {
        let _c = lock(&self.commit_lock);
        let mut st = lock(&self.st);
        let mut h = st.header.clone();
        h.generation += 1;
        h.flags |= FLAG_FROZEN;
        h.name = truncate(name, super::header::NAME_MAX);
        h.description = truncate(description, super::header::DESC_MAX);
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
