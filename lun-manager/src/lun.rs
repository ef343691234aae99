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

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
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
use lungate_block::sys as fileops;
use lungate_block::volume::{self, Volume, VolumeConfig, VolumeOptions};

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
    file: Arc<File>,
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
    let l = label.label_region();
    let mut protected = Vec::with_capacity(3);
    if label.layout.has_gpt() && l.offset != 0 {
        protected.push(0..MIB);
    }
    protected.push(l.offset..l.end());
    if label.layout.has_gpt() {
        protected.push(label.lun_size - MIB..label.lun_size);
    }
    VolumeConfig {
        lun_path: path.to_path_buf(),
        file,
        lun_uuid: label.uuid,
        size: label.lun_size,
        protected,
        options,
        engine: None,
    }
}

fn open_volume(
    path: &Path,
    file: &Arc<File>,
    label: &Label,
    access: Access,
    engine: Option<IoEngine>,
) -> Result<Volume> {
    let options = VolumeOptions {
        read_only: access == Access::ReadOnly,
        cluster_size: label.volume_cluster_size(),
    };
    let mut cfg = volume_config(path, file.clone(), label, options);
    cfg.engine = engine;
    Ok(Volume::open(cfg)?)
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
fn read_slots(file: &File, layout: Layout, region_offset: u64, backing: u64) -> SlotRead {
    let mut best: Option<(Label, u64)> = None;
    let mut errors = Vec::new();
    let mut magic = false;
    for slot in 0..2u64 {
        let at = label::slot_offset(layout, region_offset, slot);
        if at.saturating_add(LABEL_SIZE as u64) > backing {
            continue;
        }
        let mut b = vec![0u8; LABEL_SIZE];
        if file.read_exact_at(&mut b, at).is_err() {
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
    // ----- opening -------------------------------------------------------

    pub fn open(path: &Path, access: Access) -> Result<Lun> {
        Lun::open_with(path, access, None)
    }

    /// [`Lun::open`], with the volume's asynchronous data path on `engine`
    /// (a gateway serving the LUN).
    pub fn open_with(path: &Path, access: Access, engine: Option<IoEngine>) -> Result<Lun> {
        let file = OpenOptions::new()
            .read(true)
            .write(access == Access::ReadWrite)
            .open(path)
            .ctx(path, "open")?;
        let backing_size = fileops::backing_size(&file).ctx(path, "size")?;
        let is_block = fileops::is_block_device(&file).ctx(path, "stat")?;
        let (label, label_slot, found, mut warnings) = Self::find_label(path, &file, backing_size)?;
        if label.lun_size > backing_size {
            return Err(Error::Damaged {
                path: path.into(),
                why: format!(
                    "truncated: the label needs {} bytes but the backing has {backing_size}",
                    label.lun_size
                ),
            });
        }
        if label.layout.has_gpt() {
            warnings.extend(gpt::check(&file, &label));
        }
        let file = Arc::new(file);
        let volume = open_volume(path, &file, &label, access, engine)?;
        warnings.extend(volume.warnings());
        let (dir, dir_slot) = Self::read_dir(path, &volume, &label)?;
        let mut lun = Lun {
            path: path.into(),
            file,
            access,
            label,
            label_slot,
            dir,
            dir_slot,
            backing_size,
            is_block,
            found,
            warnings,
            volume: Arc::new(volume),
        };
        if access == Access::ReadWrite {
            lun.repair()?;
        }
        Ok(lun)
    }

    /// Locate the label. The footer (truncate layout) is checked first and,
    /// when it carries our magic, is authoritative: in the truncate layout
    /// the guest owns byte 0 onwards, so a label-looking block inside the
    /// disk must never be consulted while a footer exists. Then an
    /// interrupted resize's footer (only when the tail is an unwritten
    /// hole), then the aligned layout's slots in the first MiB, then the
    /// offset layout's label at the GPT's label partition (always 1 MiB).
    ///
    /// The aligned slots come before the offset label because in the
    /// aligned layout byte 1 MiB onwards is the guest's: with its slots
    /// present (even damaged) nothing the guest wrote is consulted. In the
    /// offset layout the first MiB is never the guest's, so its empty
    /// aligned slots cannot be forged.
    fn find_label(
        path: &Path,
        file: &File,
        backing: u64,
    ) -> Result<(Label, u64, Found, Vec<String>)> {
        let damaged = |why: String| Error::Damaged {
            path: path.into(),
            why,
        };
        let accept = |label: Label, slot: u64, other_bad: Option<String>, at: u64, want: Layout| {
            if label.layout != want || label.label_region().offset != at {
                return Err(damaged(format!(
                    "{} label found at {at} says it lives at {}",
                    label.layout,
                    label.label_region().offset
                )));
            }
            let mut warnings = Vec::new();
            let found = match other_bad {
                Some(why) => {
                    warnings.push(format!("one label slot is damaged: {why}"));
                    Found::OneSlot(why)
                }
                None => Found::Normal,
            };
            Ok((label, slot, found, warnings))
        };
        if backing >= LABEL_REGION_LEN {
            let tail = (backing - 1) & !(ALIGN - 1);
            match read_slots(file, Layout::Truncate, tail, backing) {
                SlotRead::Nothing => {}
                SlotRead::Bad(errs) => {
                    return Err(damaged(format!(
                        "footer label at {tail}: {}",
                        errs.join("; ")
                    )))
                }
                SlotRead::Good {
                    label,
                    slot,
                    other_bad,
                } => return accept(label, slot, other_bad, tail, Layout::Truncate),
            }
            if let Some((label, slot)) = Self::recover_footer(file, backing) {
                let why = format!(
                    "footer found at {} instead of the end of the file ({backing}): an interrupted resize",
                    label.label_region().offset
                );
                return Ok((label, slot, Found::Recovered(why.clone()), vec![why]));
            }
        }
        match read_slots(file, Layout::Aligned, 0, backing) {
            SlotRead::Nothing => {}
            SlotRead::Bad(errs) => {
                return Err(damaged(format!(
                    "aligned label in the first MiB: {}",
                    errs.join("; ")
                )))
            }
            SlotRead::Good {
                label,
                slot,
                other_bad,
            } => return accept(label, slot, other_bad, 0, Layout::Aligned),
        }
        let mut at = OFFSET_LABEL_AT;
        if let Ok((_, parts)) = gpt::read(file, backing) {
            if let Some(p) = parts
                .iter()
                .find(|p| p.type_guid == crate::format::LABEL_TYPE_GUID)
            {
                at = p.offset;
            }
        }
        match read_slots(file, Layout::Offset, at, backing) {
            SlotRead::Nothing => Err(Error::NotALun {
                path: path.into(),
                why: "no lungate GPT partition, label or footer".into(),
            }),
            SlotRead::Bad(errs) => Err(damaged(format!("label at {at}: {}", errs.join("; ")))),
            SlotRead::Good {
                label,
                slot,
                other_bad,
            } => accept(label, slot, other_bad, at, Layout::Offset),
        }
    }

    /// After an interrupted truncate-layout resize the file was extended but
    /// the new footer not yet written: the end is a hole. Walk data extents
    /// backwards for the newest footer that sits where it says it lives.
    fn recover_footer(file: &File, backing: u64) -> Option<(Label, u64)> {
        if backing < LABEL_REGION_LEN {
            return None;
        }
        let tail = (backing - 1) & !(ALIGN - 1);
        let ext = fileops::data_extents(file, 0, backing).ok()?;
        // Only when the tail itself holds no data: a fresh extension.
        if ext.iter().any(|(o, l)| o + l > tail) {
            return None;
        }
        for (o, l) in ext.iter().rev().take(64) {
            let at = (o + l - 1) & !(ALIGN - 1);
            if let SlotRead::Good { label, slot, .. } =
                read_slots(file, Layout::Truncate, at, backing)
            {
                if label.layout == Layout::Truncate && label.label_region().offset == at {
                    return Some((label, slot));
                }
            }
        }
        None
    }

    fn read_dir(path: &Path, vol: &Volume, label: &Label) -> Result<(Directory, u64)> {
        Self::read_dir_as(path, vol, label, label.uuid)
    }

    /// Read the directory expecting LUN UUID `owner` (a clone's state region
    /// starts with its parent's directory).
    fn read_dir_as(
        path: &Path,
        vol: &Volume,
        label: &Label,
        owner: Uuid,
    ) -> Result<(Directory, u64)> {
        let st = *label.state_region();
        let mut best: Option<(Directory, u64)> = None;
        let mut errors = Vec::new();
        for slot in 0..2u64 {
            let mut b = vec![0u8; DIR_SLOT_SIZE];
            vol.read(st.offset + slot * DIR_SLOT_SIZE as u64, &mut b)?;
            match Directory::decode(&b, owner, state::data_start(label.layout)) {
                Ok(d) if d.region_len > st.length => errors.push(format!(
                    "slot {slot}: directory covers {} bytes but the state region has {}",
                    d.region_len, st.length
                )),
                Ok(d) => {
                    if best
                        .as_ref()
                        .is_none_or(|(x, _)| d.generation > x.generation)
                    {
                        best = Some((d, slot));
                    }
                }
                Err(state::DirError::NoMagic) => {}
                Err(e) => errors.push(format!("slot {slot}: {e}")),
            }
        }
        best.ok_or_else(|| Error::Damaged {
            path: path.into(),
            why: format!(
                "no valid state directory ({})",
                if errors.is_empty() {
                    "both slots empty".to_string()
                } else {
                    errors.join("; ")
                }
            ),
        })
    }

    /// The LUN UUID of the LUN at `path`, from its label alone (no state
    /// directory, no volume): for finding secondary disks by UUID.
    pub fn probe_uuid(path: &Path) -> Result<Uuid> {
        Ok(Self::probe_label(path)?.uuid)
    }

    /// The validated label of the LUN at `path`, read without opening its
    /// state or its volume (cheap enough to ask of every LUN in a pool).
    pub fn probe_label(path: &Path) -> Result<Label> {
        let file = File::open(path).ctx(path, "open")?;
        let backing = fileops::backing_size(&file).ctx(path, "size")?;
        let (label, ..) = Self::find_label(path, &file, backing)?;
        Ok(label)
    }

    /// Make a new LUN at `path` (which must not exist) from snapshot
    /// `snapshot` of this one: a fresh label (new LUN UUID, name
    /// `new_name`, new region GUIDs; same size and layout), a sparse file,
    /// and a chain of one empty delta on the snapshot
    /// ([`Volume::clone_to`]). Its state is the snapshot's, re-stamped:
    /// the directory carries the new UUID, the Identity record new disk
    /// IDs and export names, the snapshot-tree record the origin, the owner
    /// record is dropped, and `secondaries` (when given) replaces the
    /// secondary-disk references. The label is written last: until then
    /// the file is not a LUN.
    pub fn clone_from_snapshot(
        &self,
        snapshot: &str,
        path: &Path,
        new_name: &str,
        uuid: Uuid,
        secondaries: Option<SecondaryDisks>,
    ) -> Result<Lun> {
        crate::format::validate_name(new_name).map_err(Error::Invalid)?;
        if self.is_block {
            return Err(Error::Invalid(format!(
                "{}: clones of block-device LUNs are not supported",
                self.path.display()
            )));
        }
        let layers = lungate_block::store::file::layers_dir(path);
        if layers.exists() {
            return Err(Error::Invalid(format!(
                "{} exists (layers of an older LUN of that name?); remove it first",
                layers.display()
            )));
        }
        let t = now();
        let mut label = self.label.clone();
        label.generation = 1;
        label.uuid = uuid;
        label.name = new_name.into();
        label.created = t;
        label.updated = t;
        for r in &mut label.regions {
            r.guid = Uuid::new_v4();
        }
        label
            .validate()
            .map_err(|e| Error::Invalid(e.to_string()))?;
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(Error::Exists { path: path.into() })
            }
            Err(e) => return Err(e).ctx(path, "create"),
        };
        let made = (|| {
            file.set_len(label.lun_size).ctx(path, "size clone")?;
            let file = Arc::new(file);
            let cfg = volume_config(path, file.clone(), &label, VolumeOptions::default());
            let vol = self.volume.clone_to(snapshot, cfg)?;
            // The snapshot's directory still names this LUN.
            let (mut dir, slot) = Self::read_dir_as(path, &vol, &label, self.uuid())?;
            dir.lun = label.uuid;
            let mut lun = Lun {
                path: path.into(),
                file,
                access: Access::ReadWrite,
                label,
                label_slot: 1,
                dir: dir.clone(),
                dir_slot: slot,
                backing_size: 0,
                is_block: false,
                found: Found::Normal,
                warnings: Vec::new(),
                volume: Arc::new(vol),
            };
            lun.backing_size = fileops::backing_size(&lun.file).ctx(path, "size")?;
            // Both slots get the re-stamped directory, so no slot of the
            // clone names another LUN.
            lun.commit_dir(dir.clone())?;
            lun.commit_dir(lun.dir.clone())?;
            let mut id: Identity = lun
                .record_json(RecordType::Identity, 0)?
                .unwrap_or(Identity { disks: vec![] });
            for d in &mut id.disks {
                d.id = crate::format::label::hex(Uuid::new_v4().as_bytes());
                d.export_name = format!("{new_name}/disk{}", d.index);
                d.description = format!(
                    "lungate {new_name} disk{} (clone of {}@{snapshot})",
                    d.index,
                    self.name()
                );
            }
            let mut tree: SnapshotTree = lun
                .record_json(RecordType::SnapshotTree, 0)?
                .unwrap_or_default();
            tree.snapshots.clear();
            tree.clone_of = Some(state::CloneOrigin {
                lun_uuid: self.uuid(),
                snapshot: snapshot.into(),
            });
            let mut recs = vec![
                (RecordType::Identity, 0, json(&id)),
                (RecordType::SnapshotTree, 0, json(&tree)),
            ];
            if let Some(s) = &secondaries {
                recs.push((RecordType::SecondaryDisks, 0, json(s)));
            }
            lun.put_records(&recs)?;
            lun.remove_record(RecordType::Owner, 0)?;
            lun.sync()?;
            lun.publish_new_label()?;
            Ok(lun)
        })();
        if made.is_err() {
            // The file is ours (created above); of the layers, only what
            // the clone's volume made under its UUID is removed.
            let _ = std::fs::remove_file(path);
            for dir in [lungate_block::store::file::staging_dir(&layers), layers] {
                let _ = lungate_block::store::file::remove_layers_of(&dir, uuid);
            }
        }
        made
    }

    /// Bring derived structures back in line with the label: rewrite a GPT
    /// that disagrees with it, re-home a footer found by recovery.
    fn repair(&mut self) -> Result<()> {
        if let Found::Recovered(_) = self.found {
            // The extension past the recovered LUN holds nothing committed.
            if !self.is_block {
                self.file
                    .set_len(self.label.lun_size)
                    .ctx(&self.path, "truncate after interrupted resize")?;
                self.backing_size = self.label.lun_size;
            }
            self.found = Found::Normal;
        }
        if self.label.layout.has_gpt()
            && !self.warnings.is_empty()
            && !gpt::check(&self.file, &self.label).is_empty()
        {
            gpt::write(&self.file, &self.label).ctx(&self.path, "rewrite GPT")?;
            self.sync_file()?;
        }
        Ok(())
    }

    // ----- creation ------------------------------------------------------

    /// Provision a new LUN at `path`: a new sparse file (which must not
    /// exist) or an existing block device large enough for it.
    pub fn create(path: &Path, spec: &CreateSpec) -> Result<Lun> {
        Self::create_inner(path, spec, None)
    }

    /// [`Lun::create`], and give every disk region real storage before the
    /// label is published (`fileops::allocate_range`: a file is fully
    /// allocated, so the guest can never hit ENOSPC; a block device's disk
    /// regions are overwritten with zeros, so nothing a previous user left
    /// there shows through). Reports the `prefill` phase to `progress`. An
    /// interrupted prefill leaves no LUN behind, only an unlabelled file or
    /// device.
    pub fn create_prefilled(
        path: &Path,
        spec: &CreateSpec,
        progress: &mut dyn Progress,
    ) -> Result<Lun> {
        Self::create_inner(path, spec, Some(progress))
    }

    fn create_inner(
        path: &Path,
        spec: &CreateSpec,
        prefill: Option<&mut dyn Progress>,
    ) -> Result<Lun> {
        crate::format::validate_name(&spec.name).map_err(Error::Invalid)?;
        if spec.disks.is_empty() {
            return Err(Error::Invalid("a LUN needs at least one --disk".into()));
        }
        if spec.disks.len() > MAX_DISKS {
            return Err(Error::Invalid(format!(
                "{} disks requested; a LUN holds at most {MAX_DISKS}",
                spec.disks.len()
            )));
        }
        if spec.vcpus == 0 || spec.vcpus > 1024 {
            return Err(Error::Invalid(format!(
                "vcpus {} not in 1..=1024",
                spec.vcpus
            )));
        }
        let mut disks = Vec::new();
        for (i, &d) in spec.disks.iter().enumerate() {
            if d == 0 {
                return Err(Error::Invalid(format!("disk{i} has size 0")));
            }
            disks.push(
                align_up(d)
                    .ok_or_else(|| Error::Invalid(format!("disk{i} size {d} is too large")))?,
            );
        }
        if spec.layout == Layout::Aligned && disks[0] <= SHADOW_LEN {
            return Err(Error::Invalid(format!(
                "the aligned layout shadows the first {} of disk0, so disk0 must be larger; {} was asked for",
                crate::size::human(SHADOW_LEN),
                crate::size::human(spec.disks[0])
            )));
        }
        let state_len = state::state_region_len(spec.layout, spec.memory)
            .ok_or_else(|| Error::Invalid(format!("memory size {} is too large", spec.memory)))?;
        let too_big = || Error::Invalid("the requested sizes overflow a 64-bit LUN".into());
        let region = |kind, index, offset, length| Region {
            kind,
            index,
            offset,
            length,
            guid: Uuid::new_v4(),
        };
        let mut regions = Vec::new();
        let mut at;
        match spec.layout {
            Layout::Offset => {
                regions.push(region(
                    RegionKind::Label,
                    0,
                    OFFSET_LABEL_AT,
                    LABEL_REGION_LEN,
                ));
                at = OFFSET_LABEL_AT + LABEL_REGION_LEN;
                regions.push(region(RegionKind::State, 0, at, state_len));
                at = at.checked_add(state_len).ok_or_else(too_big)?;
                for (i, &d) in disks.iter().enumerate() {
                    regions.push(region(RegionKind::Disk, i as u32, at, d));
                    at = at.checked_add(d).ok_or_else(too_big)?;
                }
            }
            Layout::Truncate | Layout::Aligned => {
                if spec.layout == Layout::Aligned {
                    // The first MiB: MBR, GPT and both label slots for the
                    // host; the shadowed range of disk0 for the guest.
                    regions.push(region(RegionKind::Label, 0, 0, LABEL_REGION_LEN));
                }
                regions.push(region(RegionKind::Disk, 0, 0, disks[0]));
                at = disks[0];
                regions.push(region(RegionKind::State, 0, at, state_len));
                at = at.checked_add(state_len).ok_or_else(too_big)?;
                for (i, &d) in disks.iter().enumerate().skip(1) {
                    regions.push(region(RegionKind::Disk, i as u32, at, d));
                    at = at.checked_add(d).ok_or_else(too_big)?;
                }
            }
        }
        // Offset, aligned: the last MiB holds the backup GPT. Truncate: the footer.
        let mut lun_size = at.checked_add(MIB).ok_or_else(too_big)?;

        let (file, is_block) = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) if fileops::is_block_device(&f).ctx(path, "stat")? => {
                let dev = fileops::backing_size(&f).ctx(path, "size")?;
                let dev = dev & !(ALIGN - 1);
                if dev < lun_size {
                    return Err(Error::Invalid(format!(
                        "{}: block device has {dev} usable bytes, the LUN needs {lun_size}",
                        path.display()
                    )));
                }
                lun_size = dev;
                (f, true)
            }
            Ok(_) => return Err(Error::Exists { path: path.into() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(path)
                    .ctx(path, "create")?,
                false,
            ),
            Err(e) => return Err(e).ctx(path, "open"),
        };
        if spec.layout == Layout::Truncate {
            regions.push(region(
                RegionKind::Label,
                0,
                lun_size - MIB,
                LABEL_REGION_LEN,
            ));
        }
        regions.sort_by_key(|r| (r.kind, r.index));
        let t = now();
        let label = Label {
            generation: 1,
            uuid: Uuid::new_v4(),
            layout: spec.layout,
            name: spec.name.clone(),
            lun_size,
            created: t,
            updated: t,
            cluster_size: spec.cluster_size,
            regions,
        };
        label
            .validate()
            .map_err(|e| Error::Invalid(e.to_string()))?;
        let layers = lungate_block::store::file::layers_dir(path);
        if layers.exists() {
            if !is_block {
                let _ = std::fs::remove_file(path);
            }
            return Err(Error::Invalid(format!(
                "{} exists (layers of an older LUN of that name?); remove it first",
                layers.display()
            )));
        }
        let result = Self::initialise(path, file, is_block, label, spec, prefill);
        if result.is_err() && !is_block {
            let _ = std::fs::remove_file(path);
        }
        result
    }

    fn initialise(
        path: &Path,
        file: File,
        is_block: bool,
        label: Label,
        spec: &CreateSpec,
        prefill: Option<&mut dyn Progress>,
    ) -> Result<Lun> {
        if !is_block {
            file.set_len(label.lun_size).ctx(path, "size new LUN")?;
        }
        let st = *label.state_region();
        // Clear both metadata slots of a reused block device so stale
        // structures can never be mistaken for ours: the directory, the
        // label, and with a GPT the first and last MiB (where an older
        // aligned label or truncate footer could sit). The aligned
        // layout's shadow area is the guest's first MiB: it starts zero,
        // never with what the device held.
        fileops::zero_range(&file, st.offset, 2 * DIR_SLOT_SIZE as u64).ctx(path, "clear state")?;
        fileops::zero_range(&file, label.label_region().offset, LABEL_REGION_LEN)
            .ctx(path, "clear label")?;
        if label.layout.has_gpt() {
            fileops::zero_range(&file, 0, MIB).ctx(path, "clear GPT")?;
            fileops::zero_range(&file, label.lun_size - MIB, MIB).ctx(path, "clear backup GPT")?;
        }
        if label.layout == Layout::Aligned {
            fileops::zero_range(&file, st.offset + state::SHADOW_AT, SHADOW_LEN)
                .ctx(path, "clear shadow area")?;
        }
        let file = Arc::new(file);
        let volume = Arc::new(open_volume(path, &file, &label, Access::ReadWrite, None)?);
        let mut lun = Lun {
            path: path.into(),
            file,
            volume,
            access: Access::ReadWrite,
            dir: Directory::new(label.uuid, st.length, state::data_start(label.layout)),
            dir_slot: 1,
            label,
            label_slot: 1,
            backing_size: 0,
            is_block,
            found: Found::Normal,
            warnings: Vec::new(),
        };
        lun.backing_size = fileops::backing_size(&lun.file).ctx(path, "size")?;
        let hw = HardwareConfig {
            vcpus: spec.vcpus,
            memory_bytes: spec.memory,
            devices: (0..spec.disks.len() as u32)
                .map(|i| state::Device {
                    kind: "virtio-blk".into(),
                    disk: Some(i),
                })
                .collect(),
        };
        let identity = Identity {
            disks: (0..spec.disks.len() as u32)
                .map(|i| state::DiskIdentity {
                    index: i,
                    id: crate::format::label::hex(Uuid::new_v4().as_bytes()),
                    export_name: format!("{}/disk{i}", spec.name),
                    description: format!("lungate {} disk{i}", spec.name),
                })
                .collect(),
        };
        lun.put_records(&[
            (RecordType::HardwareConfig, 0, json(&hw)),
            (RecordType::Identity, 0, json(&identity)),
            (RecordType::SnapshotTree, 0, json(&SnapshotTree::default())),
            (
                RecordType::SecondaryDisks,
                0,
                json(&SecondaryDisks::default()),
            ),
        ])?;
        if let Some(progress) = prefill {
            let disks = lun.disks();
            let total: u64 = disks.iter().map(|d| d.length).sum();
            let mut done = 0;
            progress.update("prefill", 0, total);
            for d in &disks {
                fileops::allocate_range(&lun.file, d.offset, d.length, |n| {
                    progress.update("prefill", done + n, total)
                })
                .ctx(path, "prefill disk")?;
                done += d.length;
            }
            // Durable before the label makes the LUN exist.
            lun.sync_file()?;
        }
        lun.publish_new_label()?;
        Ok(lun)
    }

    /// The last step of making a LUN (create, clone): its label, the commit
    /// point, written after everything else is durable, into slot 0; then
    /// the GPT (offset layout) and a final sync.
    fn publish_new_label(&mut self) -> Result<()> {
        let label = self.label.clone();
        self.write_label_slot(&label, 0)?;
        self.label_slot = 0;
        if self.label.layout.has_gpt() {
            gpt::write(&self.file, &self.label).ctx(&self.path, "write GPT")?;
        }
        self.sync_file()
    }

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
    pub fn file(&self) -> &Arc<File> {
        &self.file
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
            file: self.file.clone(),
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
    pub fn volume_config(&self, options: VolumeOptions) -> VolumeConfig {
        volume_config(&self.path, self.file.clone(), &self.label, options)
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
        self.file.sync_data().ctx(&self.path, "fdatasync")
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
        let mut guest: Vec<std::ops::Range<u64>> = self
            .disks()
            .iter()
            .filter_map(|d| self.disk_view(d.index))
            .flat_map(|v| v.device_ranges())
            .collect();
        guest.push(self.label.lun_size..self.label.lun_size);
        guest.sort_by_key(|r| r.start);
        let mut h = blake3::Hasher::new();
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
                            h.update(&(o + (i * BLOCK) as u64).to_le_bytes());
                            h.update(b);
                        }
                    }
                    done += n as u64;
                }
            }
        }
        Ok(*h.finalize().as_bytes())
    }

    // ----- state records -------------------------------------------------

    /// Read and verify one record's payload.
    ///
    /// A layered LUN's directory may have changed under the cached copy (a
    /// revert through [`Lun::volume`] without [`Lun::reload_state`]): a
    /// missing or mismatching record is looked up again in a fresh read of
    /// the directory before it is reported.
    pub fn record(&self, rtype: RecordType, instance: u16) -> Result<Option<Vec<u8>>> {
        match self.record_in(&self.dir, rtype, instance) {
            Ok(Some(b)) => Ok(Some(b)),
            r if !self.volume.is_layered() => r,
            r => match Self::read_dir(&self.path, &self.volume, &self.label) {
                Ok((fresh, _)) if fresh != self.dir => self.record_in(&fresh, rtype, instance),
                _ => r,
            },
        }
    }

    fn record_in(
        &self,
        dir: &Directory,
        rtype: RecordType,
        instance: u16,
    ) -> Result<Option<Vec<u8>>> {
        let Some(e) = dir.find(rtype, instance).copied() else {
            return Ok(None);
        };
        let len = usize::try_from(e.length).map_err(|_| self.rec_err(&e, "too large"))?;
        let mut b = vec![0u8; len];
        self.read_region(RegionKind::State, 0, e.offset, &mut b)?;
        if blake3::hash(&b).as_bytes() != &e.checksum {
            return Err(self.rec_err(&e, "payload checksum mismatch"));
        }
        Ok(Some(b))
    }

    /// A layered LUN re-reads its directory before changing it, so a
    /// revert done through the volume directly can never be overwritten
    /// by a stale cached directory.
    /// Re-read the state directory before changing it: another handle on
    /// the same volume ([`Lun::share`]) or a revert may have moved it on.
    fn fresh_dir(&mut self) -> Result<()> {
        if self.dir.generation == 0 {
            // Being created: no directory has been committed yet.
            return Ok(());
        }
        self.reload_state()
    }

    pub fn record_json<T: serde::de::DeserializeOwned>(
        &self,
        rtype: RecordType,
        instance: u16,
    ) -> Result<Option<T>> {
        match self.record(rtype, instance)? {
            None => Ok(None),
            Some(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| Error::Record {
                    path: self.path.clone(),
                    record: rtype.name().into(),
                    why: format!("bad JSON: {e}"),
                }),
        }
    }

    fn rec_err(&self, e: &Entry, why: &str) -> Error {
        Error::Record {
            path: self.path.clone(),
            record: format!("{} #{}", e.rtype.name(), e.instance),
            why: why.into(),
        }
    }

    /// Verify every record's checksum; returns (record, problem) pairs.
    pub fn verify_records(&self) -> Vec<(String, Option<String>)> {
        self.dir
            .entries
            .iter()
            .map(|e| {
                let name = format!("{} #{}", e.rtype.name(), e.instance);
                let r = self
                    .record(e.rtype, e.instance)
                    .err()
                    .map(|x| x.to_string());
                (name, r)
            })
            .collect()
    }

    /// Replace (or add) records atomically: payloads to free space, sync,
    /// then one new directory generation.
    pub fn put_records(&mut self, recs: &[(RecordType, u16, Vec<u8>)]) -> Result<()> {
        self.writable()?;
        self.fresh_dir()?;
        let st = *self.label.state_region();
        let mut next = self.dir.clone();
        // While writing, both the old and the new payloads must stay intact.
        let mut busy = self.dir.clone();
        for (rtype, instance, payload) in recs {
            let len = payload.len() as u64;
            let off = busy.allocate(len, st.length).ok_or_else(|| Error::Record {
                path: self.path.clone(),
                record: rtype.name().into(),
                why: format!(
                    "state region full: {len} bytes do not fit (region {} bytes, {} used); grow it with lunctl resize --memory",
                    st.length,
                    self.dir.used_bytes()
                ),
            })?;
            if busy.entries.len() >= state::MAX_ENTRIES * 2 {
                return Err(Error::Invalid("too many state records".into()));
            }
            let e = Entry {
                rtype: *rtype,
                instance: *instance,
                flags: 0,
                offset: off,
                length: len,
                checksum: *blake3::hash(payload).as_bytes(),
            };
            self.volume.write(st.offset + off, payload)?;
            busy.entries.push(Entry {
                instance: u16::MAX,
                ..e
            });
            next.entries
                .retain(|x| !(x.rtype == *rtype && x.instance == *instance));
            next.entries.push(e);
        }
        if next.entries.len() > state::MAX_ENTRIES {
            return Err(Error::Invalid(format!(
                "state directory would hold {} records; the limit is {}",
                next.entries.len(),
                state::MAX_ENTRIES
            )));
        }
        next.entries.sort_by_key(|e| (e.rtype, e.instance));
        next.region_len = st.length;
        self.sync()?;
        self.commit_dir(next)
    }

    /// The current directory entry of a record, read afresh (another
    /// handle or a revert may have moved the directory on).
    pub fn record_entry(&mut self, rtype: RecordType, instance: u16) -> Result<Option<Entry>> {
        self.fresh_dir()?;
        Ok(self.dir.find(rtype, instance).copied())
    }

    /// Read part of a record's payload: `buf.len()` bytes from `at` inside
    /// it. The caller checks the whole payload against `e.checksum`.
    pub fn read_record_at(&self, e: &Entry, at: u64, buf: &mut [u8]) -> Result<()> {
        let end = at.checked_add(buf.len() as u64);
        if end.is_none_or(|end| end > e.length) {
            return Err(Error::Invalid(format!(
                "read of {} bytes at {at} runs past the end of {} #{} ({} bytes)",
                buf.len(),
                e.rtype.name(),
                e.instance,
                e.length
            )));
        }
        self.read_region(RegionKind::State, 0, e.offset + at, buf)
    }

    /// Write the records `puts` (type, instance, length) with payloads read
    /// from `src` back to back, and remove `removes`, in one new directory
    /// generation; returns it. Payloads stream through a 1 MiB buffer to
    /// free space (the space of every current record, removed ones
    /// included, stays intact until the commit), so a crash or a short
    /// `src` leaves the previous directory current and changes nothing.
    /// `check` sees the whole payload of each record whose type is JSON
    /// (at most [`MAX_JSON_RECORD`] bytes) before anything is committed.
    pub fn write_records_from(
        &mut self,
        puts: &[(RecordType, u16, u64)],
        removes: &[(RecordType, u16)],
        src: &mut dyn std::io::Read,
        check: &mut RecordCheck<'_>,
    ) -> Result<u64> {
        self.writable()?;
        self.fresh_dir()?;
        let st = *self.label.state_region();
        let mut next = self.dir.clone();
        let mut busy = self.dir.clone();
        for (i, (rtype, instance, _)) in puts.iter().enumerate() {
            if puts[..i]
                .iter()
                .any(|(t, n, _)| t == rtype && n == instance)
            {
                return Err(Error::Invalid(format!(
                    "{} #{instance} is written twice in one batch",
                    rtype.name()
                )));
            }
        }
        let mut buf = vec![0u8; 1 << 20];
        for (rtype, instance, len) in puts {
            let (rtype, instance, len) = (*rtype, *instance, *len);
            let off = busy.allocate(len, st.length).ok_or_else(|| Error::Record {
                path: self.path.clone(),
                record: format!("{} #{instance}", rtype.name()),
                why: format!(
                    "state region full: {len} bytes do not fit (region {} bytes, {} used)",
                    st.length,
                    busy.used_bytes()
                ),
            })?;
            if busy.entries.len() >= state::MAX_ENTRIES * 2 {
                return Err(Error::Invalid("too many state records".into()));
            }
            let json = rtype.is_json();
            if json && len > MAX_JSON_RECORD {
                return Err(Error::Invalid(format!(
                    "{} #{instance}: {len} bytes exceeds the {MAX_JSON_RECORD}-byte limit of a JSON record",
                    rtype.name()
                )));
            }
            let mut kept = Vec::new();
            let mut hasher = blake3::Hasher::new();
            let mut done = 0u64;
            while done < len {
                let n = usize::try_from((len - done).min(buf.len() as u64)).expect("≤ 1 MiB");
                src.read_exact(&mut buf[..n]).map_err(|e| Error::Record {
                    path: self.path.clone(),
                    record: format!("{} #{instance}", rtype.name()),
                    why: format!("payload ended after {done} of {len} bytes: {e}"),
                })?;
                hasher.update(&buf[..n]);
                if json {
                    kept.extend_from_slice(&buf[..n]);
                }
                self.volume.write(st.offset + off + done, &buf[..n])?;
                done += n as u64;
            }
            if json {
                check(rtype, instance, &kept).map_err(|why| Error::Record {
                    path: self.path.clone(),
                    record: format!("{} #{instance}", rtype.name()),
                    why,
                })?;
            }
            let e = Entry {
                rtype,
                instance,
                flags: 0,
                offset: off,
                length: len,
                checksum: *hasher.finalize().as_bytes(),
            };
            busy.entries.push(Entry {
                instance: u16::MAX,
                ..e
            });
            next.entries
                .retain(|x| !(x.rtype == rtype && x.instance == instance));
            next.entries.push(e);
        }
        for (rtype, instance) in removes {
            next.entries
                .retain(|x| !(x.rtype == *rtype && x.instance == *instance));
        }
        if next.entries.len() > state::MAX_ENTRIES {
            return Err(Error::Invalid(format!(
                "state directory would hold {} records; the limit is {}",
                next.entries.len(),
                state::MAX_ENTRIES
            )));
        }
        next.entries.sort_by_key(|e| (e.rtype, e.instance));
        next.region_len = st.length;
        self.sync()?;
        self.commit_dir(next)?;
        Ok(self.dir.generation)
    }

    /// One record's payload as snapshot `snap` holds it (a JSON record or
    /// another small one, at most [`MAX_JSON_RECORD`] bytes), verified;
    /// `None` if the snapshot's directory has no such record. Reads the
    /// frozen snapshot, so nothing live changes.
    pub fn snapshot_record(
        &self,
        snap: &str,
        rtype: RecordType,
        instance: u16,
    ) -> Result<Option<Vec<u8>>> {
        let st = *self.label.state_region();
        let mut best: Option<Directory> = None;
        for slot in 0..2u64 {
            let mut b = vec![0u8; DIR_SLOT_SIZE];
            self.volume
                .read_snapshot(snap, st.offset + slot * DIR_SLOT_SIZE as u64, &mut b)?;
            if let Ok(d) = Directory::decode(&b, self.uuid(), state::data_start(self.layout())) {
                if best.as_ref().is_none_or(|x| d.generation > x.generation) {
                    best = Some(d);
                }
            }
        }
        let d = best.ok_or_else(|| Error::Record {
            path: self.path.clone(),
            record: format!("snapshot {snap}"),
            why: "no valid state directory in the snapshot".into(),
        })?;
        let Some(e) = d.find(rtype, instance).copied() else {
            return Ok(None);
        };
        if e.length > MAX_JSON_RECORD {
            return Err(Error::Invalid(format!(
                "{} #{instance} of snapshot {snap} is {} bytes; only records up to {MAX_JSON_RECORD} bytes are read from a snapshot",
                rtype.name(),
                e.length
            )));
        }
        let mut b = vec![0u8; usize::try_from(e.length).expect("capped")];
        self.volume
            .read_snapshot(snap, st.offset + e.offset, &mut b)?;
        if blake3::hash(&b).as_bytes() != &e.checksum {
            return Err(self.rec_err(&e, "payload checksum mismatch in the snapshot"));
        }
        Ok(Some(b))
    }

    /// Remove a record (its space is free once the new directory is current).
    pub fn remove_record(&mut self, rtype: RecordType, instance: u16) -> Result<bool> {
        self.writable()?;
        self.fresh_dir()?;
        let mut next = self.dir.clone();
        let before = next.entries.len();
        next.entries
            .retain(|e| !(e.rtype == rtype && e.instance == instance));
        if next.entries.len() == before {
            return Ok(false);
        }
        self.commit_dir(next)?;
        Ok(true)
    }

    fn commit_dir(&mut self, mut next: Directory) -> Result<()> {
        let st = *self.label.state_region();
        next.generation = self.dir.generation + 1;
        let slot = 1 - self.dir_slot;
        self.volume
            .write(st.offset + slot * DIR_SLOT_SIZE as u64, &next.encode())?;
        self.sync()?;
        self.dir = next;
        self.dir_slot = slot;
        Ok(())
    }

    // ----- label updates -------------------------------------------------

    fn write_label_slot(&self, label: &Label, slot: u64) -> Result<()> {
        let at = label.slot_offset(slot);
        self.file
            .write_all_at(&label.encode(), at)
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
        // A plain volume is a thin view of the file; a new label may move
        // the footer or change the size, so the view follows it. (A layered
        // volume never sees a label change: resize refuses it.)
        if !self.volume.is_layered() {
            self.volume = Arc::new(open_volume(
                &self.path,
                &self.file,
                &self.label,
                self.access,
                self.volume.engine().cloned(),
            )?);
        }
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

    // ----- resize --------------------------------------------------------

    /// Grow disk `index` to `new_len` bytes, or add disk `index` when it is
    /// the next free index. Never shrinks; never loses a byte.
    pub fn resize_disk(&mut self, index: u32, new_len: u64) -> Result<()> {
        self.resize_disk_with(index, new_len, &mut crate::progress::silent())
    }

    /// [`Lun::resize_disk`], reporting the regions it moves (`move`) and
    /// the space it zeroes (`zero`) to `progress`.
    pub fn resize_disk_with(
        &mut self,
        index: u32,
        new_len: u64,
        progress: &mut dyn Progress,
    ) -> Result<()> {
        self.not_layered()?;
        let new_len = align_up(new_len)
            .ok_or_else(|| Error::Invalid(format!("size {new_len} is too large")))?;
        match self.region(RegionKind::Disk, index) {
            Some(r) if new_len < r.length => Err(Error::Invalid(format!(
                "disk{index} is {} bytes; shrinking to {new_len} would lose data and is refused",
                r.length
            ))),
            Some(r) if new_len == r.length => Ok(()),
            Some(_) => self.grow(RegionKind::Disk, index, new_len, progress),
            None if index as usize == self.disks().len() => {
                if self.disks().len() >= MAX_DISKS {
                    return Err(Error::Invalid(format!(
                        "a LUN holds at most {MAX_DISKS} disks"
                    )));
                }
                if new_len == 0 {
                    return Err(Error::Invalid("a new disk needs a size".into()));
                }
                self.grow(RegionKind::Disk, index, new_len, progress)?;
                let mut id: Identity = self
                    .record_json(RecordType::Identity, 0)?
                    .unwrap_or(Identity { disks: vec![] });
                id.disks.push(state::DiskIdentity {
                    index,
                    id: crate::format::label::hex(Uuid::new_v4().as_bytes()),
                    export_name: format!("{}/disk{index}", self.name()),
                    description: format!("lungate {} disk{index}", self.name()),
                });
                let mut hw: HardwareConfig = self.hardware()?;
                hw.devices.push(state::Device {
                    kind: "virtio-blk".into(),
                    disk: Some(index),
                });
                self.put_records(&[
                    (RecordType::Identity, 0, json(&id)),
                    (RecordType::HardwareConfig, 0, json(&hw)),
                ])
            }
            None => Err(Error::Invalid(format!(
                "no disk{index}: the LUN has disks 0..{}; a new disk must be disk{}",
                self.disks().len(),
                self.disks().len()
            ))),
        }
    }

    pub fn hardware(&self) -> Result<HardwareConfig> {
        self.record_json(RecordType::HardwareConfig, 0)?
            .ok_or_else(|| Error::Record {
                path: self.path.clone(),
                record: "hardware-config".into(),
                why: "missing".into(),
            })
    }

    /// Resizing moves regions in the file, under the layers' feet: refused
    /// once the LUN has layers.
    fn not_layered(&self) -> Result<()> {
        if self.volume.is_layered() {
            return Err(Error::Invalid(format!(
                "{} has snapshot layers in {} (snapshots, a clone, or a flattened chain); \
                 resizing a layered LUN is not supported",
                self.name(),
                self.volume.layers_dir().display()
            )));
        }
        Ok(())
    }

    /// Set the VM's memory size, growing the state region to hold it.
    pub fn resize_memory(&mut self, memory: u64) -> Result<()> {
        self.resize_memory_with(memory, &mut crate::progress::silent())
    }

    /// [`Lun::resize_memory`], reporting to `progress` as
    /// [`Lun::resize_disk_with`] does.
    pub fn resize_memory_with(&mut self, memory: u64, progress: &mut dyn Progress) -> Result<()> {
        self.not_layered()?;
        let need = state::state_region_len(self.label.layout, memory)
            .ok_or_else(|| Error::Invalid(format!("memory size {memory} is too large")))?;
        let st = *self.label.state_region();
        if need > st.length {
            self.grow(RegionKind::State, 0, need, progress)?;
        }
        let mut hw = self.hardware()?;
        hw.memory_bytes = memory;
        self.put_records(&[(RecordType::HardwareConfig, 0, json(&hw))])
    }

    /// The crash-safe grow protocol (docs/lun-format.md, "Resize"):
    /// 1. extend the file if the new layout needs more room;
    /// 2. copy every region in the way to free space, sync;
    /// 3. label N+1: moved regions at their new homes, sync;
    /// 4. zero the range the grown region will cover, sync;
    /// 5. label N+2: the region at its new length, sync;
    /// 6. zero what the moved regions left behind; rewrite the GPT.
    fn grow(
        &mut self,
        kind: RegionKind,
        index: u32,
        new_len: u64,
        progress: &mut dyn Progress,
    ) -> Result<()> {
        self.writable()?;
        self.not_layered()?;
        let old = self.label.clone();
        let target = old.region(kind, index).copied();
        let tgt_off = target.map(|r| r.offset);
        let layout = old.layout;
        // Regions that stay put: everything but the target, the movers, and
        // (truncate layout) the footer, which follows the end of the file.
        let want_end = tgt_off.map(|o| o.checked_add(new_len));
        if let Some(None) = want_end {
            return Err(Error::Invalid("new size overflows".into()));
        }
        let grow_range = target.map(|r| (r.end(), r.offset + new_len));
        let is_mover = |r: &Region| {
            if Some(*r) == target {
                return false;
            }
            if layout == Layout::Truncate && r.kind == RegionKind::Label {
                return false;
            }
            matches!(grow_range, Some((s, e)) if r.offset < e && s < r.end())
        };
        if layout.has_gpt() {
            if let Some(m) = old
                .regions
                .iter()
                .find(|r| is_mover(r) && r.kind == RegionKind::Label)
            {
                return Err(Error::Invalid(format!(
                    "cannot grow {kind}{index} over the label region at {}",
                    m.offset
                )));
            }
        }
        let movers: Vec<Region> = old
            .regions
            .iter()
            .filter(|r| is_mover(r))
            .copied()
            .collect();
        // Occupied while copying: every old region, plus the target's new extent.
        let mut busy: Vec<(u64, u64)> = old.regions.iter().map(|r| (r.offset, r.end())).collect();
        if let (Some(t), Some(Some(e))) = (target, want_end) {
            busy.push((t.offset, e));
        }
        // Aligned: the label region [0, 1 MiB) and disk0 are busy, so
        // nothing is placed below disk0's end.
        let floor = match layout {
            Layout::Offset => OFFSET_LABEL_AT,
            Layout::Truncate | Layout::Aligned => 0,
        };
        let data_limit = |lun_size: u64| match layout {
            Layout::Offset | Layout::Aligned => lun_size - OFFSET_TAIL_RESERVED,
            Layout::Truncate => lun_size - LABEL_REGION_LEN,
        };
        let mut placed: Vec<Region> = Vec::new();
        let mut to_place: Vec<Region> = movers.clone();
        if target.is_none() {
            to_place.push(Region {
                kind,
                index,
                offset: 0,
                length: new_len,
                guid: Uuid::new_v4(),
            });
        }
        let mut lun_size = old.lun_size;
        for r in &to_place {
            let fit = first_fit(&busy, floor, data_limit(lun_size), r.length);
            let at = match fit {
                Some(at) => at,
                None if self.is_block => {
                    return Err(Error::Invalid(format!(
                        "{}: not enough free space on the block device for {} ({} bytes)",
                        self.path.display(),
                        r.name(),
                        r.length
                    )))
                }
                None => {
                    // Place past everything, including the old tail MiB.
                    let end = busy
                        .iter()
                        .map(|b| b.1)
                        .max()
                        .unwrap_or(0)
                        .max(old.lun_size);
                    lun_size = end
                        .checked_add(r.length)
                        .and_then(|x| x.checked_add(MIB))
                        .ok_or_else(|| Error::Invalid("new size overflows".into()))?;
                    end
                }
            };
            busy.push((at, at + r.length));
            placed.push(Region { offset: at, ..*r });
        }
        if let Some(Some(e)) = want_end {
            // The target's own growth may need a bigger file.
            let limit = data_limit(lun_size);
            if e > limit {
                if self.is_block {
                    return Err(Error::Invalid(format!(
                        "{}: growing {kind}{index} to {new_len} bytes needs {} more bytes than the block device has",
                        self.path.display(),
                        e - limit
                    )));
                }
                let end = busy
                    .iter()
                    .map(|b| b.1)
                    .max()
                    .unwrap_or(0)
                    .max(old.lun_size);
                lun_size = lun_size.max(end.max(e) + MIB);
            }
        }
        if self.is_block {
            lun_size = old.lun_size;
        }
        // 1. room
        if lun_size > self.backing_size {
            self.file.set_len(lun_size).ctx(&self.path, "extend")?;
            self.backing_size = lun_size;
            if layout.has_gpt() {
                // The current partitions, the backup at the new end: the
                // tail is never an unwritten extension, which the label
                // search would take for an interrupted truncate resize and
                // walk the guest's data for a footer.
                gpt::write_in(&self.file, &old, lun_size).ctx(&self.path, "extend GPT")?;
                self.sync_file()?;
            }
        }
        // 2. copy movers
        let total: u64 = movers.iter().map(|r| r.length).sum();
        let mut moved = 0;
        progress.update("move", 0, total);
        for m in &movers {
            let dst = placed.iter().find(|p| p.guid == m.guid).expect("placed");
            // Holes are skipped: what they would have copied counts as done.
            let before = moved;
            fileops::copy_range(&self.file, m.offset, dst.offset, m.length, |n| {
                moved += n;
                progress.update("move", moved, total);
            })
            .ctx(&self.path, "copy region")?;
            moved = before + m.length;
            progress.update("move", moved, total);
        }
        self.sync()?;
        // 3. label N+1
        let mut mid = old.clone();
        mid.lun_size = lun_size;
        for r in mid.regions.iter_mut() {
            if let Some(p) = placed.iter().find(|p| p.guid == r.guid) {
                *r = *p;
            }
            if layout == Layout::Truncate && r.kind == RegionKind::Label {
                r.offset = lun_size - LABEL_REGION_LEN;
            }
        }
        self.commit_label(mid.clone())?;
        // 4. zero the range the region grows into (it held moved data).
        let mut fin = mid.clone();
        // One `zero` phase over every range zeroed from here on; its total
        // grows as ranges are added, `done` never falls.
        let (mut zeroed, mut zero_total) = (0u64, 0u64);
        let mut zero = |file: &File, off: u64, len: u64| {
            zero_total += len;
            progress.update("zero", zeroed, zero_total);
            let r = fileops::zero_range_with(file, off, len, |d| {
                progress.update("zero", zeroed + d, zero_total)
            });
            zeroed += len;
            r
        };
        match target {
            Some(t) => {
                let (s, e) = (t.end(), t.offset + new_len);
                zero(&self.file, s, e - s).ctx(&self.path, "zero new space")?;
                for r in fin.regions.iter_mut() {
                    if r.guid == t.guid {
                        r.length = new_len;
                    }
                }
            }
            None => {
                let p = placed.last().expect("new region placed");
                zero(&self.file, p.offset, p.length).ctx(&self.path, "zero new disk")?;
                fin.regions.push(*p);
                fin.regions.sort_by_key(|r| (r.kind, r.index));
            }
        }
        self.sync()?;
        // 5. label N+2
        self.commit_label(fin.clone())?;
        // 6. clean up what is no longer any region's.
        let mut vacated: Vec<(u64, u64)> = movers.iter().map(|r| (r.offset, r.end())).collect();
        if layout == Layout::Truncate && old.label_region().offset != fin.label_region().offset {
            vacated.push((old.label_region().offset, old.label_region().end()));
        }
        if layout.has_gpt() && fin.lun_size != old.lun_size {
            vacated.push((old.lun_size - OFFSET_TAIL_RESERVED, old.lun_size));
        }
        for (s, e) in vacated {
            for (gs, ge) in subtract(s, e, &fin.regions) {
                zero(&self.file, gs, ge - gs).ctx(&self.path, "zero vacated")?;
            }
        }
        if layout.has_gpt() {
            gpt::write(&self.file, &self.label).ctx(&self.path, "rewrite GPT")?;
        }
        self.sync()?;
        if kind == RegionKind::State {
            // Let the directory cover the grown region.
            let d = self.dir.clone();
            self.commit_dir(Directory {
                region_len: new_len,
                ..d
            })?;
        }
        self.warnings.clear();
        Ok(())
    }

    /// Delete the LUN: a file is removed (and its layers directory); a
    /// block device has its label, GPT and state directory wiped so it is no
    /// longer recognised. Refused while clones depend on its layers.
    pub fn delete(self) -> Result<()> {
        self.writable()?;
        let deps = self.volume.dependents();
        if !deps.is_empty() {
            return Err(Error::Invalid(format!(
                "{} cannot be deleted: clones depend on its layers: {}; delete or flatten them first",
                self.name(),
                deps.iter()
                    .map(|d| d.with_extension("lun").display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let layers = self.volume.layers_dir().to_path_buf();
        let Lun {
            path,
            file,
            volume,
            label,
            is_block,
            ..
        } = self;
        // Nothing of the volume is wanted any more; skip its final flush.
        if let Ok(v) = Arc::try_unwrap(volume) {
            v.crash();
        }
        if !is_block {
            // The LUN file is the commit point; a crash before the layers
            // are gone leaves a directory no LUN names, which `create`
            // refuses to reuse.
            std::fs::remove_file(&path).ctx(&path, "remove")?;
        } else {
            let l = &label;
            fileops::zero_range(&file, l.label_region().offset, LABEL_REGION_LEN)
                .ctx(&path, "wipe label")?;
            fileops::zero_range(&file, l.state_region().offset, 2 * DIR_SLOT_SIZE as u64)
                .ctx(&path, "wipe state directory")?;
            if l.layout.has_gpt() {
                fileops::zero_range(&file, 0, MIB).ctx(&path, "wipe GPT")?;
                fileops::zero_range(&file, l.lun_size - MIB, MIB).ctx(&path, "wipe GPT")?;
            }
            file.sync_data().ctx(&path, "fdatasync")?;
        }
        if layers.is_dir() {
            std::fs::remove_dir_all(&layers).ctx(&layers, "remove layers directory")?;
        }
        Ok(())
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

    fn spec(layout: Layout) -> CreateSpec {
        CreateSpec {
            name: "t".into(),
            disks: vec![4 * MIB, 2 * MIB],
            memory: MIB,
            vcpus: 2,
            layout,
            cluster_size: 0,
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
            // Resizing a layered LUN is refused with a clear error.
            let e = l.resize_disk(0, 8 * MIB).unwrap_err().to_string();
            assert!(e.contains("layered LUN is not supported"), "{e}");
            let e = l.resize_memory(2 * MIB).unwrap_err().to_string();
            assert!(e.contains("layered LUN is not supported"), "{e}");
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
                assert!(gpt::check(l.file(), l.label()).is_empty());
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
            l.file().set_len(len).unwrap();
            gpt::write_in(l.file(), &old, len).unwrap();
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
