//! An open LUN: its label, state directory and bounds-checked access to each
//! region. Every metadata update is crash-safe: data first, `fdatasync`,
//! then a new label or directory into the slot that is *not* current,
//! `fdatasync`. A crash at any point leaves the previous generation valid.
//!
//! A `Lun` owns its [`Volume`]: every byte outside the label (and, in the
//! offset and aligned layouts, the GPT) — the state directory, the
//! records, the disk regions, the aligned layout's shadow area — is read
//! and written through it, so state records snapshot and revert with the
//! disks. The label and GPT are written to the file directly (they are not
//! layered). Where a disk's bytes live is [`Lun::disk_view`], the same
//! description the gateway builds the disk's export from.
//!
//! One job per file: `open.rs` (finding and checking the label, opening,
//! repairing derived structures), `create.rs` (provisioning a new LUN),
//! `records.rs` (the state directory and its records), `resize.rs` (growing
//! a disk or the state region), `clone.rs` (a new VM from a snapshot, and
//! deleting a LUN); this file holds the type, its accessors, region I/O and
//! label updates.

mod clone;
mod create;
pub mod layouts;
mod open;
mod records;
mod resize;

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use uuid::Uuid;

use crate::error::{Error, IoContext, Result};
use crate::format::label::{self, Label, LabelError, LABEL_SIZE, MAGIC as LABEL_MAGIC};
use crate::format::state::{
    self, Directory, Entry, HardwareConfig, Identity, RecordType, SecondaryDisks, SnapshotTree,
    DIR_SLOT_SIZE,
};
use crate::format::{
    align_up, gpt, Layout, Region, RegionKind, ALIGN, LABEL_REGION_LEN, MIB, OFFSET_LABEL_AT,
    OFFSET_TAIL_RESERVED, SHADOW_LEN,
};
use crate::progress::Progress;
use lungate_block::engine::IoEngine;
use lungate_block::region::{Pieces, ShadowMap, View};
use lungate_block::store::Object;
use lungate_block::sys as fileops;
use lungate_block::volume::{self, StoreVolume, Volume, VolumeConfig, VolumeOptions};

use crate::backing::Backing;

/// How to open the backing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    ReadOnly,
    ReadWrite,
}

/// What `lunctl create` asks for.
#[derive(Debug, Clone)]
pub struct CreateSpec {
    pub name: String,
    /// Disk sizes in bytes; rounded up to 1 MiB.
    pub disks: Vec<u64>,
    /// Guest memory in bytes; sizes the state region.
    pub memory: u64,
    pub vcpus: u32,
    pub layout: Layout,
    /// Cluster size of the LUN's copy-on-write volume in bytes: a power of
    /// two in 4 KiB..=2 MiB, or 0 for the default (64 KiB).
    pub cluster_size: u32,
    /// Keep a checksum of every data cluster (state and disks), checked on
    /// every read; see `docs/volumes.md`. Fixed at creation.
    pub checksums: bool,
}

/// Most disks one LUN can hold (the region table has 64 entries).
pub const MAX_DISKS: usize = crate::format::label::MAX_REGIONS - 2;

/// How the label was found; anything but `Normal` is worth reporting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    Normal,
    /// Only one slot was valid; the other is damaged or from an older write.
    OneSlot(String),
    /// The footer was not at the end of the file: an interrupted resize.
    Recovered(String),
}

pub struct Lun {
    path: PathBuf,
    /// The LUN's bytes: a file (or block device), or an RBD image.
    backing: Backing,
    access: Access,
    label: Label,
    /// Slot (0 or 1) holding the current label.
    label_slot: u64,
    dir: Directory,
    dir_slot: u64,
    backing_size: u64,
    is_block: bool,
    found: Found,
    /// Problems that do not stop use (GPT out of sync, one bad slot).
    warnings: Vec<String>,
    /// The LUN's byte range through its chain of layers.
    volume: Arc<Volume>,
}

impl From<volume::Error> for Error {
    fn from(e: volume::Error) -> Error {
        match e {
            volume::Error::Io { path, op, source } => Error::Io { path, op, source },
            volume::Error::Corrupt { path, why } => Error::Damaged {
                path,
                why: format!("volume layers: {why}"),
            },
            volume::Error::ReadOnly(path) => Error::ReadOnly { path },
            volume::Error::DataChecksum {
                path,
                layer,
                cluster,
                phys,
            } => Error::Damaged {
                why: format!(
                    "cluster {cluster} (physical {phys}) of layer {layer} fails its data checksum"
                ),
                path,
            },
            e @ volume::Error::NoSnapshot(_) => Error::NoSnapshot(e.to_string()),
            e @ volume::Error::SnapshotExists(_) => Error::SnapshotExists(e.to_string()),
            e => Error::Invalid(e.to_string()),
        }
    }
}

/// The volume configuration of the LUN at `path` with `label`: its whole
/// byte range, with the label region protected, and in the offset and
/// aligned layouts also the primary and backup GPT (first and last MiB;
/// in the aligned layout the first MiB is the label region): both are
/// derived from the label and rewritten in place, so they must never be
/// frozen into a layer.
pub fn volume_config(
    path: &Path,
    file: Arc<File>,
    label: &Label,
    options: VolumeOptions,
) -> VolumeConfig {
    let s = store_volume(path, label, options);
    VolumeConfig {
        lun_path: s.lun_path,
        file,
        lun_uuid: s.lun_uuid,
        size: s.size,
        protected: s.protected,
        options: s.options,
        engine: None,
    }
}

/// [`volume_config`] without the file: for a LUN whose bytes are not a
/// file (an RBD image).
pub fn store_volume(path: &Path, label: &Label, options: VolumeOptions) -> StoreVolume {
    let l = label.label_region();
    let mut protected = Vec::with_capacity(3);
    if label.layout.has_gpt() && l.offset != 0 {
        protected.push(0..MIB);
    }
    protected.push(l.offset..l.end());
    if label.layout.has_gpt() {
        protected.push(label.lun_size - MIB..label.lun_size);
    }
    StoreVolume {
        lun_path: path.to_path_buf(),
        lun_uuid: label.uuid,
        size: label.lun_size,
        protected,
        options,
        engine: None,
    }
}

fn open_volume(
    path: &Path,
    backing: &Backing,
    label: &Label,
    access: Access,
    engine: Option<IoEngine>,
) -> Result<Volume> {
    let options = VolumeOptions {
        read_only: access == Access::ReadOnly,
        cluster_size: label.volume_cluster_size(),
    };
    match &backing.file {
        Some(file) => {
            let mut cfg = volume_config(path, file.clone(), label, options);
            cfg.engine = engine;
            Ok(Volume::open(cfg)?)
        }
        None => {
            let mut cfg = store_volume(path, label, options);
            cfg.engine = engine;
            backing.open_native_volume(path, label, cfg)
        }
    }
}

impl std::fmt::Debug for Lun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lun")
            .field("path", &self.path)
            .field("name", &self.label.name)
            .field("uuid", &self.label.uuid)
            .finish()
    }
}

pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Result of reading both label slots at one place.
enum SlotRead {
    /// Neither slot carries the magic.
    Nothing,
    /// Magic present but no slot is valid.
    Bad(Vec<String>),
    Good {
        label: Label,
        slot: u64,
        other_bad: Option<String>,
    },
}

/// Read both label slots of a `layout` label region at `region_offset`.
fn read_slots(file: &dyn Object, layout: Layout, region_offset: u64, backing: u64) -> SlotRead {
    let mut best: Option<(Label, u64)> = None;
    let mut errors = Vec::new();
    let mut magic = false;
    for slot in 0..2u64 {
        let at = label::slot_offset(layout, region_offset, slot);
        if at.saturating_add(LABEL_SIZE as u64) > backing {
            continue;
        }
        let mut b = vec![0u8; LABEL_SIZE];
        if file.read_at(&mut b, at).is_err() {
            continue;
        }
        match Label::decode(&b) {
            Ok(l) => {
                magic = true;
                if best
                    .as_ref()
                    .is_none_or(|(x, _)| l.generation > x.generation)
                {
                    best = Some((l, slot));
                }
            }
            Err(LabelError::NoMagic) => errors.push(format!("slot {slot}: empty")),
            Err(e) => {
                magic = true;
                errors.push(format!("slot {slot}: {e}"));
            }
        }
    }
    match best {
        Some((label, slot)) => {
            let other_bad = errors
                .into_iter()
                .find(|e| !e.starts_with(&format!("slot {slot}")) && !e.ends_with("empty"));
            SlotRead::Good {
                label,
                slot,
                other_bad,
            }
        }
        None if magic => SlotRead::Bad(errors),
        None => SlotRead::Nothing,
    }
}

/// Largest payload of a JSON state record accepted by
/// [`Lun::write_records_from`] (it is held in memory to be checked).
pub const MAX_JSON_RECORD: u64 = 16 << 20;

/// Validates a JSON record's payload before [`Lun::write_records_from`]
/// commits it; the error says why it is refused.
pub type RecordCheck<'a> =
    dyn FnMut(RecordType, u16, &[u8]) -> std::result::Result<(), String> + 'a;

impl Lun {
    // ----- accessors -----------------------------------------------------

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn name(&self) -> &str {
        &self.label.name
    }
    pub fn uuid(&self) -> Uuid {
        self.label.uuid
    }
    pub fn layout(&self) -> Layout {
        self.label.layout
    }
    pub fn label(&self) -> &Label {
        &self.label
    }
    pub fn directory(&self) -> &Directory {
        &self.dir
    }
    /// The LUN file, for a file or block-device LUN (`None` for RBD).
    pub fn file(&self) -> Option<&Arc<File>> {
        self.backing.file.as_ref()
    }
    /// The LUN's bytes, whatever holds them.
    pub fn backing(&self) -> &Backing {
        &self.backing
    }
    /// Whether the LUN is an RBD image.
    pub fn is_rbd(&self) -> bool {
        self.backing.is_rbd()
    }
    /// The LUN's volume: its whole byte range through its chain of layers
    /// (the label region reads from the file and refuses writes).
    /// A second handle on this LUN sharing its file and its one volume (never
    /// a second `Volume`): what a gateway hands to a [`crate::group::Group`]
    /// for an operation while it keeps serving through its own handle. Every
    /// record change re-reads the state directory first, so handles never
    /// write from a stale one; callers serialise record changes.
    pub fn share(&self) -> Lun {
        Lun {
            path: self.path.clone(),
            backing: self.backing.clone(),
            access: self.access,
            label: self.label.clone(),
            label_slot: self.label_slot,
            dir: self.dir.clone(),
            dir_slot: self.dir_slot,
            backing_size: self.backing_size,
            is_block: self.is_block,
            found: self.found.clone(),
            warnings: self.warnings.clone(),
            volume: self.volume.clone(),
        }
    }

    /// This LUN's [`volume_config`] (the one its volume was opened with,
    /// but for `options`).
    /// (A file LUN's; panics for an RBD LUN, whose volume is on the RBD store.)
    pub fn volume_config(&self, options: VolumeOptions) -> VolumeConfig {
        let file = self.backing.file.clone().expect("a file LUN");
        volume_config(&self.path, file, &self.label, options)
    }

    pub fn volume(&self) -> &Arc<Volume> {
        &self.volume
    }
    pub fn access(&self) -> Access {
        self.access
    }

    /// Re-read the state directory through the volume (after a revert
    /// brought back an older one).
    pub fn reload_state(&mut self) -> Result<()> {
        let (dir, slot) = Self::read_dir(&self.path, &self.volume, &self.label)?;
        self.dir = dir;
        self.dir_slot = slot;
        Ok(())
    }
    pub fn backing_size(&self) -> u64 {
        self.backing_size
    }
    pub fn is_block_device(&self) -> bool {
        self.is_block
    }
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }
    pub fn found(&self) -> &Found {
        &self.found
    }
    pub fn label_slot(&self) -> u64 {
        self.label_slot
    }

    /// Disk regions in index order.
    pub fn disks(&self) -> Vec<Region> {
        let mut d: Vec<Region> = self.label.disks().copied().collect();
        d.sort_by_key(|r| r.index);
        d
    }

    pub fn region(&self, kind: RegionKind, index: u32) -> Option<Region> {
        self.label.region(kind, index).copied()
    }

    /// The 16-byte identity of disk `index`, as recorded at creation.
    pub fn disk_id(&self, index: u32) -> Option<[u8; 16]> {
        let id: Identity = self.record_json(RecordType::Identity, 0).ok()??;
        id.disks.iter().find(|d| d.index == index)?.id_bytes()
    }

    // ----- region I/O ----------------------------------------------------

    /// Where disk `index`'s bytes live in the LUN (its volume): a window
    /// at the region's offset, or in the aligned layout disk0 at its own
    /// offsets with the shadowed first MiB in the state region's shadow
    /// area. The gateway builds the disk's export from this, and the
    /// region I/O below maps through it, so both agree byte for byte.
    pub fn disk_view(&self, index: u32) -> Option<View> {
        let r = self.region(RegionKind::Disk, index)?;
        if self.label.layout == Layout::Aligned && index == 0 {
            let at = self.label.state_region().offset + state::SHADOW_AT;
            let map = ShadowMap::new(r.length, SHADOW_LEN, at)
                .expect("a validated aligned label leaves room for the shadow");
            return Some(View::Aligned(map));
        }
        Some(View::Window {
            base: r.offset,
            size: r.length,
        })
    }

    /// The LUN pieces of `[offset, offset + len)` inside a region (a disk
    /// as its guest sees it), bounds-checked.
    fn pieces(&self, kind: RegionKind, index: u32, offset: u64, len: u64) -> Result<Pieces> {
        let r = self.region(kind, index).ok_or_else(|| {
            Error::Invalid(format!("{}: no region {kind}{index}", self.path.display()))
        })?;
        let view = match kind {
            RegionKind::Disk => self.disk_view(index).expect("the region exists"),
            _ => View::Window {
                base: r.offset,
                size: r.length,
            },
        };
        view.pieces(offset, len).map_err(|_| Error::OutOfBounds {
            what: format!("{} {}", self.path.display(), r.name()),
            offset,
            len,
            size: r.length,
        })
    }

    /// Read `buf.len()` bytes at `offset` inside a region.
    pub fn read_region(
        &self,
        kind: RegionKind,
        index: u32,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        for p in self.pieces(kind, index, offset, buf.len() as u64)?.iter() {
            let from = (p.disk - offset) as usize;
            self.volume
                .read(p.at, &mut buf[from..from + p.len as usize])?;
        }
        Ok(())
    }

    /// Write `buf` at `offset` inside a region (not durable until [`Lun::sync`]).
    pub fn write_region(
        &self,
        kind: RegionKind,
        index: u32,
        offset: u64,
        buf: &[u8],
    ) -> Result<()> {
        self.writable()?;
        for p in self.pieces(kind, index, offset, buf.len() as u64)?.iter() {
            let from = (p.disk - offset) as usize;
            self.volume.write(p.at, &buf[from..from + p.len as usize])?;
        }
        Ok(())
    }

    /// Make `[offset, offset + len)` inside a region read as zeros (not
    /// durable until [`Lun::sync`]).
    pub fn zero_region(&self, kind: RegionKind, index: u32, offset: u64, len: u64) -> Result<()> {
        self.writable()?;
        for p in self.pieces(kind, index, offset, len)?.iter() {
            self.volume.write_zeroes(p.at, p.len, true)?;
        }
        Ok(())
    }

    /// Make every write through the volume durable.
    pub fn sync(&self) -> Result<()> {
        if self.access == Access::ReadOnly {
            return Ok(());
        }
        Ok(self.volume.flush()?)
    }

    /// Make direct writes to the file (label, GPT) durable.
    fn sync_file(&self) -> Result<()> {
        self.backing.base.sync().ctx(&self.path, "fdatasync")
    }

    fn writable(&self) -> Result<()> {
        if self.access == Access::ReadOnly {
            return Err(Error::ReadOnly {
                path: self.path.clone(),
            });
        }
        Ok(())
    }

    /// blake3 over every byte of the LUN that no guest disk holds (GPT,
    /// label, state, gaps; in the aligned layout the first MiB is hidden
    /// and the shadow area is the guest's) as the volume reads them. Tests
    /// use it to prove that guest I/O never reached the hidden parts. Each
    /// 4 KiB block that is not all zeros is hashed with its offset, so the
    /// digest depends on the bytes only, not on whether zeros are a hole or
    /// written.
    pub fn hidden_digest(&self) -> std::io::Result<[u8; 32]> {
        let mut h = blake3::Hasher::new();
        for (offset, block) in self.hidden_blocks()? {
            h.update(&offset.to_le_bytes());
            h.update(&block);
        }
        Ok(*h.finalize().as_bytes())
    }

    /// What [`Lun::hidden_digest`] hashes, block by block: the offset and
    /// blake3 of each hidden 4 KiB block that is not all zeros, in offset
    /// order. Comparing two lists names the blocks that changed.
    pub fn hidden_blocks(&self) -> std::io::Result<Vec<(u64, [u8; 32])>> {
        let mut guest: Vec<std::ops::Range<u64>> = self
            .disks()
            .iter()
            .filter_map(|d| self.disk_view(d.index))
            .flat_map(|v| v.device_ranges())
            .collect();
        guest.push(self.label.lun_size..self.label.lun_size);
        guest.sort_by_key(|r| r.start);
        let mut at = 0;
        let mut ranges = Vec::new();
        for d in &guest {
            if d.start > at {
                ranges.push((at, d.start));
            }
            at = at.max(d.end);
        }
        let io = |e: volume::Error| std::io::Error::other(e.to_string());
        const BLOCK: usize = 4096;
        let zero = [0u8; BLOCK];
        let mut buf = vec![0u8; 1 << 20];
        let mut out = Vec::new();
        for (start, end) in ranges {
            for x in self.volume.extents(start, end - start).map_err(io)? {
                if !x.data {
                    continue;
                }
                let mut done = 0;
                while done < x.length {
                    let n = (x.length - done).min(buf.len() as u64) as usize;
                    let o = x.offset + done;
                    self.volume.read(o, &mut buf[..n]).map_err(io)?;
                    for (i, b) in buf[..n].chunks(BLOCK).enumerate() {
                        if b != &zero[..b.len()] {
                            out.push((o + (i * BLOCK) as u64, *blake3::hash(b).as_bytes()));
                        }
                    }
                    done += n as u64;
                }
            }
        }
        Ok(out)
    }

    // ----- label updates -------------------------------------------------

    fn write_label_slot(&self, label: &Label, slot: u64) -> Result<()> {
        let at = label.slot_offset(slot);
        self.backing
            .base
            .write_at(&label.encode(), at)
            .ctx(&self.path, "write label")
    }

    /// Commit a new label generation into the non-current slot.
    fn commit_label(&mut self, mut next: Label) -> Result<()> {
        next.generation = self.label.generation + 1;
        next.updated = now();
        next.validate().map_err(|e| Error::Invalid(e.to_string()))?;
        let moved = next.label_region().offset != self.label.label_region().offset;
        if moved {
            // A new footer location: both slots, so it is never half there.
            self.write_label_slot(&next, 0)?;
            self.write_label_slot(&next, 1)?;
            self.label_slot = 1;
        } else {
            let slot = 1 - self.label_slot;
            self.write_label_slot(&next, slot)?;
            self.label_slot = slot;
        }
        self.sync_file()?;
        self.label = next;
        // A new label may move the footer or change the size and the
        // protected ranges, so the volume follows it.
        self.reopen_volume()
    }

    /// Open the volume again with the current label (after a label change
    /// or a volume grow); the caller has flushed what it wrote.
    fn reopen_volume(&mut self) -> Result<()> {
        self.volume = Arc::new(open_volume(
            &self.path,
            &self.backing,
            &self.label,
            self.access,
            self.volume.engine().cloned(),
        )?);
        Ok(())
    }

    // ----- secondary disks -----------------------------------------------

    pub fn secondaries(&self) -> Result<SecondaryDisks> {
        Ok(self
            .record_json(RecordType::SecondaryDisks, 0)?
            .unwrap_or_default())
    }

    /// Record `other` as a secondary disk of this VM, by LUN UUID.
    pub fn attach_secondary(&mut self, other: &Lun) -> Result<()> {
        if other.uuid() == self.uuid() {
            return Err(Error::Invalid(format!(
                "{} cannot be a secondary disk of itself",
                self.name()
            )));
        }
        let dir = |p: &Path| {
            p.parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .canonicalize()
                .ok()
        };
        if dir(self.path()).is_none() || dir(self.path()) != dir(other.path()) {
            return Err(Error::Invalid(format!(
                "{} is not in the pool of {} ({}): a VM's secondary disks live in its own pool, where its group finds them by UUID; move it there first",
                other.path().display(),
                self.name(),
                self.path().parent().unwrap_or(Path::new(".")).display()
            )));
        }
        let mut s = self.secondaries()?;
        if s.disks.iter().any(|d| d.lun_uuid == other.uuid()) {
            return Err(Error::Invalid(format!(
                "{} ({}) is already attached to {}",
                other.name(),
                other.uuid(),
                self.name()
            )));
        }
        s.disks.push(state::SecondaryRef {
            lun_uuid: other.uuid(),
            name: other.name().into(),
            path_hint: other
                .path()
                .canonicalize()
                .unwrap_or_else(|_| other.path().into())
                .display()
                .to_string(),
            attached: now(),
        });
        self.put_records(&[(RecordType::SecondaryDisks, 0, json(&s))])
    }
}

pub(crate) fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("state records serialise")
}

/// Lowest offset in `[floor, limit)` where `len` bytes avoid every busy range.
fn first_fit(busy: &[(u64, u64)], floor: u64, limit: u64, len: u64) -> Option<u64> {
    let mut b: Vec<(u64, u64)> = busy.to_vec();
    b.sort_unstable();
    let mut at = floor;
    for (s, e) in b {
        if s >= at && s - at >= len {
            break;
        }
        at = at.max(e);
    }
    (at.checked_add(len)? <= limit).then_some(at)
}

/// The parts of `[s, e)` not covered by any region.
fn subtract(s: u64, e: u64, regions: &[Region]) -> Vec<(u64, u64)> {
    let mut out = vec![(s, e)];
    for r in regions {
        out = out
            .into_iter()
            .flat_map(|(a, b)| {
                let mut v = Vec::new();
                if r.end() <= a || r.offset >= b {
                    v.push((a, b));
                } else {
                    if r.offset > a {
                        v.push((a, r.offset));
                    }
                    if r.end() < b {
                        v.push((r.end(), b));
                    }
                }
                v
            })
            .collect();
    }
    out
}

/// Whether `b` starts like one of our label blocks (scanner fast path).
pub fn has_label_magic(b: &[u8]) -> bool {
    b.len() >= 8 && &b[..8] == LABEL_MAGIC
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn spec(layout: Layout) -> CreateSpec {
        CreateSpec {
            name: "t".into(),
            disks: vec![4 * MIB, 2 * MIB],
            memory: MIB,
            vcpus: 2,
            layout,
            cluster_size: 0,
            checksums: false,
        }
    }

    #[test]
    fn state_records_and_disks_snapshot_and_revert_through_the_volume() {
        let d = tempfile::tempdir().unwrap();
        for layout in Layout::ALL {
            let p = d.path().join(format!("{layout}.lun"));
            let mut l = Lun::create(&p, &spec(layout)).unwrap();
            l.write_region(RegionKind::Disk, 1, 0, b"before").unwrap();
            // The guest's partition table (the aligned layout's shadow).
            l.write_region(RegionKind::Disk, 0, 510, b"\x55\xaa")
                .unwrap();
            l.volume().snapshot("a", "").unwrap();
            let before = l.hardware().unwrap();
            let mut hw = before.clone();
            hw.vcpus = 7;
            l.put_records(&[(RecordType::HardwareConfig, 0, json(&hw))])
                .unwrap();
            l.write_region(RegionKind::Disk, 1, 0, b"after!").unwrap();
            l.write_region(RegionKind::Disk, 0, 510, b"\0\0").unwrap();
            l.sync().unwrap();
            drop(l);
            // Reopened: the new record and data come from the live layer.
            let mut l = Lun::open(&p, Access::ReadWrite).unwrap();
            assert_eq!(l.hardware().unwrap().vcpus, 7);
            l.volume().revert("a").unwrap();
            // Without a reload the records still come from the reverted
            // directory, and a record update starts from it.
            assert_eq!(l.hardware().unwrap(), before);
            l.put_records(&[(RecordType::Owner, 0, b"{}".to_vec())])
                .unwrap();
            assert_eq!(l.hardware().unwrap(), before);
            assert!(l.verify_records().iter().all(|(_, e)| e.is_none()));
            l.reload_state().unwrap();
            assert_eq!(l.hardware().unwrap(), before);
            let mut b = [0u8; 6];
            l.read_region(RegionKind::Disk, 1, 0, &mut b).unwrap();
            assert_eq!(&b, b"before");
            let mut b = [0u8; 2];
            l.read_region(RegionKind::Disk, 0, 510, &mut b).unwrap();
            assert_eq!(&b, b"\x55\xaa", "{layout}: sector 0 after the revert");
            // A layered LUN grows (moving what is in the way through the
            // volume) and keeps its data; the snapshot keeps its layout.
            let d0 = l.disks()[0].length;
            l.resize_disk(0, d0 + 8 * MIB).unwrap();
            let mut b = [0u8; 6];
            l.read_region(RegionKind::Disk, 1, 0, &mut b).unwrap();
            assert_eq!(&b, b"before", "{layout}: disk1 after the grow");
            let mut b = [0u8; 2];
            l.read_region(RegionKind::Disk, 0, 510, &mut b).unwrap();
            assert_eq!(&b, b"\x55\xaa", "{layout}: sector 0 after the grow");
            assert_eq!(
                l.snapshot_layout("a")
                    .unwrap()
                    .region("disk0")
                    .unwrap()
                    .length,
                d0
            );
            let e = l.resize_disk(0, d0).unwrap_err().to_string();
            assert!(e.contains("shrinking"), "{e}");
            assert!(l
                .snapshot_record("a", RecordType::HardwareConfig, 0)
                .unwrap()
                .is_some());
            // A read-only open writes nothing and sees the same state.
            drop(l);
            let ro = Lun::open(&p, Access::ReadOnly).unwrap();
            assert_eq!(ro.hardware().unwrap(), before);
            assert!(ro.volume().is_read_only());
            drop(ro);
            // Delete takes the layers with it.
            let layers = lungate_block::store::file::layers_dir(&p);
            assert!(layers.is_dir());
            Lun::open(&p, Access::ReadWrite).unwrap().delete().unwrap();
            assert!(!layers.exists() && !p.exists());
        }
    }

    #[test]
    fn create_then_open_in_both_layouts() {
        let d = tempfile::tempdir().unwrap();
        for layout in Layout::ALL {
            let p = d.path().join(format!("{layout}.lun"));
            let made = Lun::create(&p, &spec(layout)).unwrap();
            let l = Lun::open(&p, Access::ReadOnly).unwrap();
            assert_eq!(l.uuid(), made.uuid());
            assert_eq!(l.disks().len(), 2);
            assert!(l.warnings().is_empty(), "{:?}", l.warnings());
            assert_eq!(l.hardware().unwrap().vcpus, 2);
            assert!(l.disk_id(1).is_some());
            if layout != Layout::Offset {
                assert_eq!(l.disks()[0].offset, 0);
            }
        }
    }

    #[test]
    fn first_fit_and_subtract() {
        assert_eq!(first_fit(&[(0, 10), (20, 30)], 0, 100, 10), Some(10));
        assert_eq!(first_fit(&[(0, 10), (20, 30)], 0, 100, 11), Some(30));
        assert_eq!(first_fit(&[(0, 10)], 0, 15, 10), None);
        let r = Region {
            kind: RegionKind::Disk,
            index: 0,
            offset: 10,
            length: 10,
            guid: Uuid::nil(),
        };
        assert_eq!(subtract(0, 30, &[r]), vec![(0, 10), (20, 30)]);
    }

    #[test]
    fn grow_preserves_every_byte_in_both_layouts() {
        let d = tempfile::tempdir().unwrap();
        for layout in Layout::ALL {
            let p = d.path().join(format!("{layout}.lun"));
            let mut l = Lun::create(&p, &spec(layout)).unwrap();
            let pat0: Vec<u8> = (0..4 * MIB).map(|i| (i % 251) as u8).collect();
            let pat1: Vec<u8> = (0..2 * MIB).map(|i| (i % 241) as u8).collect();
            l.write_region(RegionKind::Disk, 0, 0, &pat0).unwrap();
            l.write_region(RegionKind::Disk, 1, 0, &pat1).unwrap();
            l.put_records(&[(RecordType::VcpuState, 0, vec![5u8; 1000])])
                .unwrap();
            l.resize_disk(0, 9 * MIB).unwrap();
            l.resize_memory(3 * MIB).unwrap();
            l.resize_disk(2, 3 * MIB).unwrap();
            drop(l);
            let l = Lun::open(&p, Access::ReadOnly).unwrap();
            assert!(l.warnings().is_empty(), "{:?}", l.warnings());
            let mut b = vec![0u8; 4 * MIB as usize];
            l.read_region(RegionKind::Disk, 0, 0, &mut b).unwrap();
            assert_eq!(b, pat0);
            let mut z = vec![1u8; 5 * MIB as usize];
            l.read_region(RegionKind::Disk, 0, 4 * MIB, &mut z).unwrap();
            assert!(z.iter().all(|&x| x == 0), "grown space must read zeros");
            let mut b = vec![0u8; 2 * MIB as usize];
            l.read_region(RegionKind::Disk, 1, 0, &mut b).unwrap();
            assert_eq!(b, pat1);
            assert_eq!(
                l.record(RecordType::VcpuState, 0).unwrap().unwrap(),
                vec![5u8; 1000]
            );
            assert_eq!(l.hardware().unwrap().memory_bytes, 3 * MIB);
            assert_eq!(l.disks().len(), 3);
            if layout != Layout::Offset {
                assert_eq!(l.disks()[0].offset, 0);
                assert_eq!(l.disks()[0].length, 9 * MIB);
            }
            if layout.has_gpt() {
                assert!(gpt::check(&*l.backing().base, l.label()).is_empty());
            }
        }
    }

    #[test]
    fn shrinking_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.lun");
        let mut l = Lun::create(&p, &spec(Layout::Offset)).unwrap();
        assert!(l.resize_disk(0, MIB).is_err());
        assert!(l.resize_disk(5, MIB).is_err());
    }

    #[test]
    fn interrupted_truncate_grow_recovers_the_old_footer() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.lun");
        let l = Lun::create(&p, &spec(Layout::Truncate)).unwrap();
        let size = l.label().lun_size;
        drop(l);
        // Step 1 of a grow, then a crash: the file is longer, the end a hole.
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(size + 64 * MIB).unwrap();
        drop(f);
        let l = Lun::open(&p, Access::ReadOnly).unwrap();
        assert!(matches!(l.found(), Found::Recovered(_)));
        drop(l);
        let l = Lun::open(&p, Access::ReadWrite).unwrap();
        assert_eq!(l.backing_size(), size);
        drop(l);
        assert_eq!(
            Lun::open(&p, Access::ReadOnly).unwrap().found(),
            &Found::Normal
        );
    }

    #[test]
    fn torn_label_write_falls_back_to_the_other_slot() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.lun");
        let mut l = Lun::create(&p, &spec(Layout::Offset)).unwrap();
        let other = l.secondaries().unwrap();
        assert!(other.disks.is_empty());
        // Two updates put generation 3 in slot 0, generation 2 in slot 1.
        l.resize_disk(1, 3 * MIB).unwrap();
        let gen = l.label().generation;
        let slot = l.label_slot();
        drop(l);
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(
            &[0xffu8; 100],
            OFFSET_LABEL_AT + slot * crate::format::LABEL_SLOT_STRIDE + 200,
        )
        .unwrap();
        drop(f);
        let l = Lun::open(&p, Access::ReadOnly).unwrap();
        assert_eq!(l.label().generation, gen - 1);
        assert!(matches!(l.found(), Found::OneSlot(_)));
    }

    fn file_bytes(p: &Path, at: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        File::open(p).unwrap().read_exact_at(&mut b, at).unwrap();
        b
    }

    #[test]
    fn aligned_disk0_keeps_every_block_past_the_first_mib_at_its_own_offset() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.lun");
        let l = Lun::create(&p, &spec(Layout::Aligned)).unwrap();
        let head = file_bytes(&p, 0, MIB as usize);
        assert_eq!(&head[510..512], &[0x55, 0xaa], "protective MBR");
        assert_eq!(&head[512..520], b"EFI PART");
        let st = *l.label().state_region();
        let pat: Vec<u8> = (0..3 * MIB).map(|i| (i % 253) as u8 + 1).collect();
        l.write_region(RegionKind::Disk, 0, 0, &pat).unwrap();
        l.sync().unwrap();
        let mut back = vec![0u8; pat.len()];
        l.read_region(RegionKind::Disk, 0, 0, &mut back).unwrap();
        assert_eq!(back, pat);
        drop(l);
        // The host's first MiB is untouched; the guest's lives in the
        // shadow area; the rest is where the guest put it.
        assert_eq!(file_bytes(&p, 0, MIB as usize), head);
        assert_eq!(
            file_bytes(&p, st.offset + state::SHADOW_AT, MIB as usize),
            &pat[..MIB as usize]
        );
        assert_eq!(file_bytes(&p, MIB, 2 * MIB as usize), &pat[MIB as usize..]);
        let l = Lun::open(&p, Access::ReadWrite).unwrap();
        assert!(l.warnings().is_empty(), "{:?}", l.warnings());
        assert!(l.verify_records().iter().all(|(_, e)| e.is_none()));
        // The shadow area is no record's: records are placed after it.
        let start = state::data_start(Layout::Aligned);
        assert!(l.directory().entries.iter().all(|e| e.offset >= start));
        assert_eq!(
            l.disk_view(0).unwrap().device_ranges(),
            vec![
                MIB..4 * MIB,
                st.offset + state::SHADOW_AT..st.offset + state::SHADOW_AT + MIB
            ]
        );
    }

    #[test]
    fn aligned_label_wins_over_anything_the_guest_writes_at_one_mib() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.lun");
        let l = Lun::create(&p, &spec(Layout::Aligned)).unwrap();
        let uuid = l.uuid();
        // The guest forges an offset-layout label where an offset LUN
        // keeps its label (its disk0 byte 1 MiB is LUN byte 1 MiB), and a
        // GPT in its own first sectors.
        let mut forged = crate::format::label::tests::sample(Layout::Offset);
        forged.lun_size = l.label().lun_size;
        let b = forged.encode();
        l.write_region(RegionKind::Disk, 0, MIB, &b).unwrap();
        l.write_region(RegionKind::Disk, 0, MIB + (512 << 10), &b)
            .unwrap();
        l.write_region(RegionKind::Disk, 0, 0, &file_bytes(&p, 0, 64 << 10))
            .unwrap();
        l.sync().unwrap();
        drop(l);
        assert_eq!(Lun::probe_uuid(&p).unwrap(), uuid);
        // Even with the host's GPT destroyed, the aligned slots decide.
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[0u8; 34 * 512], 0).unwrap();
        drop(f);
        let l = Lun::open(&p, Access::ReadOnly).unwrap();
        assert_eq!(l.uuid(), uuid);
        assert!(
            l.warnings().iter().any(|w| w.contains("GPT")),
            "{:?}",
            l.warnings()
        );
        drop(l);
        // A read-write open rewrites it from the label.
        drop(Lun::open(&p, Access::ReadWrite).unwrap());
        let l = Lun::open(&p, Access::ReadOnly).unwrap();
        assert!(l.warnings().is_empty(), "{:?}", l.warnings());
        // Damaged aligned slots make the LUN damaged, never the guest's.
        drop(l);
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        for at in crate::format::ALIGNED_LABEL_SLOTS {
            f.write_all_at(&[0xff; 8], at + 100).unwrap();
        }
        drop(f);
        let e = Lun::open(&p, Access::ReadOnly).unwrap_err().to_string();
        assert!(e.contains("aligned label in the first MiB"), "{e}");
    }

    #[test]
    fn an_extended_gpt_lun_never_takes_a_footer_from_guest_data() {
        let d = tempfile::tempdir().unwrap();
        for layout in [Layout::Offset, Layout::Aligned] {
            let p = d.path().join(format!("{layout}.lun"));
            let l = Lun::create(&p, &spec(layout)).unwrap();
            let uuid = l.uuid();
            // A truncate footer forged inside disk0, sitting where its own
            // region table says.
            let r = |kind, offset, length| Region {
                kind,
                index: 0,
                offset,
                length,
                guid: Uuid::new_v4(),
            };
            let disk = l.disks()[0];
            let at = (disk.offset + 2 * MIB) & !(MIB - 1);
            let forged = Label {
                generation: 99,
                uuid: Uuid::new_v4(),
                layout: Layout::Truncate,
                name: "evil".into(),
                lun_size: at + MIB,
                created: 0,
                updated: 0,
                cluster_size: 0,
                regions: vec![
                    r(RegionKind::Label, at, MIB),
                    r(RegionKind::State, MIB, MIB),
                    r(RegionKind::Disk, 0, MIB),
                ],
            };
            forged.validate().unwrap();
            l.write_region(RegionKind::Disk, 0, at - disk.offset, &forged.encode())
                .unwrap();
            l.sync().unwrap();
            // What step 1 of a grow leaves behind when it is interrupted:
            // a longer file whose new tail holds the backup GPT.
            let old = l.label().clone();
            let len = old.lun_size + 64 * MIB;
            l.file().unwrap().set_len(len).unwrap();
            gpt::write_in(&*l.backing().base, &old, len).unwrap();
            drop(l);
            let l = Lun::open(&p, Access::ReadOnly).unwrap();
            assert_eq!(l.uuid(), uuid, "{layout}");
            assert_eq!(l.found(), &Found::Normal, "{layout}");
        }
    }

    #[test]
    fn aligned_disk0_must_be_larger_than_the_shadowed_range() {
        let d = tempfile::tempdir().unwrap();
        let mut s = spec(Layout::Aligned);
        s.disks[0] = MIB;
        let e = Lun::create(&d.path().join("a.lun"), &s)
            .unwrap_err()
            .to_string();
        assert!(e.contains("disk0 must be larger"), "{e}");
        assert!(!d.path().join("a.lun").exists());
    }
}
