//! The label: a 4096-byte, blake3-checksummed block naming the LUN and
//! holding its region table. Two slots hold two copies; the valid copy with
//! the highest generation wins, and an update always overwrites the *other*
//! slot, so a torn write can only damage a copy that is not the current one.
//!
//! Layout of one label block (little-endian; see docs/lun-format.md):
//!
//! | off  | len  | field                                         |
//! |------|------|-----------------------------------------------|
//! | 0    | 8    | magic `LUNGATE\0`                             |
//! | 8    | 2    | format major (1)                              |
//! | 10   | 2    | format minor (1)                              |
//! | 12   | 4    | label size (4096)                             |
//! | 16   | 8    | generation                                    |
//! | 24   | 16   | LUN UUID (RFC 4122 byte order)                |
//! | 40   | 1    | layout (1 offset, 2 truncate, 3 aligned)      |
//! | 41   | 1    | name length (1..=64)                          |
//! | 42   | 2    | region count (3..=64)                         |
//! | 44   | 4    | flags (0)                                     |
//! | 48   | 8    | LUN size in bytes                             |
//! | 56   | 8    | created, Unix seconds                         |
//! | 64   | 8    | updated, Unix seconds                         |
//! | 72   | 4    | volume cluster size, bytes (0: 65536)         |
//! | 76   | 52   | reserved, zero                                |
//! | 128  | 64   | VM name, UTF-8, zero padded                   |
//! | 192  | 3072 | region table: 64 entries of 48 bytes          |
//! | 3264 | 800  | reserved, zero                                |
//! | 4064 | 32   | blake3 of bytes 0..4064                       |
//!
//! Region entry (48 bytes): kind u16, index u16, flags u32, offset u64,
//! length u64, GUID 16 bytes, reserved 8 bytes.

use thiserror::Error;
use uuid::Uuid;

use super::{
    Layout, Region, RegionKind, ALIGN, ALIGNED_LABEL_SLOTS, LABEL_REGION_LEN, LABEL_SLOT_STRIDE,
    MIB, OFFSET_LABEL_AT, SHADOW_LEN,
};

pub const MAGIC: &[u8; 8] = b"LUNGATE\0";
pub const VERSION_MAJOR: u16 = 1;
/// Minor 1 added the volume cluster size at byte 72 (reserved, so zero,
/// in minor 0 labels: the default).
pub const VERSION_MINOR: u16 = 1;
pub const LABEL_SIZE: usize = 4096;
pub const NAME_MAX: usize = 64;
pub const MAX_REGIONS: usize = 64;
const NAME_AT: usize = 128;
const TABLE_AT: usize = 192;
const ENTRY_SIZE: usize = 48;
const CHECKSUM_AT: usize = LABEL_SIZE - 32;

/// Why a label block was rejected.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum LabelError {
    #[error("no lungate label magic")]
    NoMagic,
    #[error("label checksum mismatch (stored {stored}, computed {computed})")]
    Checksum { stored: String, computed: String },
    #[error(
        "unsupported label format version {major}.{minor} (this build reads {VERSION_MAJOR}.x)"
    )]
    Version { major: u16, minor: u16 },
    #[error("label field {field} is invalid: {why}")]
    Field { field: &'static str, why: String },
    #[error("region {a} overlaps region {b}")]
    Overlap { a: String, b: String },
    #[error("region {region} [{offset}, +{length}) {why}")]
    Region {
        region: String,
        offset: u64,
        length: u64,
        why: String,
    },
}

fn field(field: &'static str, why: impl Into<String>) -> LabelError {
    LabelError::Field {
        field,
        why: why.into(),
    }
}

/// The decoded label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Label {
    pub generation: u64,
    pub uuid: Uuid,
    pub layout: Layout,
    pub name: String,
    /// Bytes of the backing file the LUN spans.
    pub lun_size: u64,
    pub created: u64,
    pub updated: u64,
    /// Cluster size of the LUN's copy-on-write volume in bytes, fixed at
    /// creation: a power of two in 4 KiB..=2 MiB, or 0 for the default
    /// ([`DEFAULT_CLUSTER_SIZE`]).
    pub cluster_size: u32,
    /// Sorted by (kind, index).
    pub regions: Vec<Region>,
}

/// The volume cluster size of a label that names none.
pub const DEFAULT_CLUSTER_SIZE: u32 = 64 << 10;

impl Label {
    /// The volume cluster size in bytes (the default when the label names none).
    pub fn volume_cluster_size(&self) -> u32 {
        if self.cluster_size == 0 {
            DEFAULT_CLUSTER_SIZE
        } else {
            self.cluster_size
        }
    }
}

/// Whether `cs` may be stored as a label's cluster size.
pub fn valid_cluster_size(cs: u32) -> bool {
    cs == 0 || (cs.is_power_of_two() && (4096..=2 << 20).contains(&cs))
}

impl Label {
    /// The label region (the one holding both label slots).
    pub fn label_region(&self) -> &Region {
        self.region(RegionKind::Label, 0)
            .expect("validated label has a label region")
    }

    pub fn state_region(&self) -> &Region {
        self.region(RegionKind::State, 0)
            .expect("validated label has a state region")
    }

    pub fn region(&self, kind: RegionKind, index: u32) -> Option<&Region> {
        self.regions
            .iter()
            .find(|r| r.kind == kind && r.index == index)
    }

    pub fn disks(&self) -> impl Iterator<Item = &Region> {
        self.regions.iter().filter(|r| r.kind == RegionKind::Disk)
    }

    /// Where label slot `slot` (0 or 1) lives in the backing: the label
    /// region's start and its middle, except in the `aligned` layout, whose
    /// label region `[0, 1 MiB)` starts with the MBR and GPT.
    pub fn slot_offset(&self, slot: u64) -> u64 {
        slot_offset(self.layout, self.label_region().offset, slot)
    }

    /// Encode into one label block, computing the checksum. The label must
    /// be valid (see [`Label::validate`]); encoding does not re-check.
    pub fn encode(&self) -> [u8; LABEL_SIZE] {
        let mut b = [0u8; LABEL_SIZE];
        b[0..8].copy_from_slice(MAGIC);
        b[8..10].copy_from_slice(&VERSION_MAJOR.to_le_bytes());
        b[10..12].copy_from_slice(&VERSION_MINOR.to_le_bytes());
        b[12..16].copy_from_slice(&(LABEL_SIZE as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.generation.to_le_bytes());
        b[24..40].copy_from_slice(self.uuid.as_bytes());
        b[40] = self.layout.code();
        b[41] = self.name.len() as u8;
        b[42..44].copy_from_slice(&(self.regions.len() as u16).to_le_bytes());
        b[48..56].copy_from_slice(&self.lun_size.to_le_bytes());
        b[56..64].copy_from_slice(&self.created.to_le_bytes());
        b[64..72].copy_from_slice(&self.updated.to_le_bytes());
        b[72..76].copy_from_slice(&self.cluster_size.to_le_bytes());
        b[NAME_AT..NAME_AT + self.name.len()].copy_from_slice(self.name.as_bytes());
        for (i, r) in self.regions.iter().enumerate() {
            let e = &mut b[TABLE_AT + i * ENTRY_SIZE..TABLE_AT + (i + 1) * ENTRY_SIZE];
            e[0..2].copy_from_slice(&r.kind.code().to_le_bytes());
            e[2..4].copy_from_slice(&(r.index as u16).to_le_bytes());
            e[8..16].copy_from_slice(&r.offset.to_le_bytes());
            e[16..24].copy_from_slice(&r.length.to_le_bytes());
            e[24..40].copy_from_slice(r.guid.as_bytes());
        }
        let sum = blake3::hash(&b[..CHECKSUM_AT]);
        b[CHECKSUM_AT..].copy_from_slice(sum.as_bytes());
        b
    }

    /// Decode and fully validate one label block. Never panics.
    pub fn decode(b: &[u8]) -> Result<Label, LabelError> {
        if b.len() < LABEL_SIZE || &b[0..8] != MAGIC {
            return Err(LabelError::NoMagic);
        }
        let b = &b[..LABEL_SIZE];
        let computed = blake3::hash(&b[..CHECKSUM_AT]);
        if computed.as_bytes() != &b[CHECKSUM_AT..] {
            return Err(LabelError::Checksum {
                stored: hex(&b[CHECKSUM_AT..CHECKSUM_AT + 8]),
                computed: hex(&computed.as_bytes()[..8]),
            });
        }
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));

        let (major, minor) = (u16_at(8), u16_at(10));
        if major != VERSION_MAJOR {
            return Err(LabelError::Version { major, minor });
        }
        if u32_at(12) as usize != LABEL_SIZE {
            return Err(field(
                "label size",
                format!("{} != {LABEL_SIZE}", u32_at(12)),
            ));
        }
        let layout = Layout::from_code(b[40])
            .ok_or_else(|| field("layout", format!("unknown code {}", b[40])))?;
        let name_len = b[41] as usize;
        if name_len == 0 || name_len > NAME_MAX {
            return Err(field(
                "name length",
                format!("{name_len} not in 1..={NAME_MAX}"),
            ));
        }
        if b[NAME_AT + name_len..NAME_AT + NAME_MAX]
            .iter()
            .any(|&c| c != 0)
        {
            return Err(field("name", "bytes after the name are not zero"));
        }
        let name = std::str::from_utf8(&b[NAME_AT..NAME_AT + name_len])
            .map_err(|e| field("name", e.to_string()))?
            .to_string();
        super::validate_name(&name).map_err(|e| field("name", e))?;
        let count = u16_at(42) as usize;
        if !(3..=MAX_REGIONS).contains(&count) {
            return Err(field(
                "region count",
                format!("{count} not in 3..={MAX_REGIONS}"),
            ));
        }
        if u32_at(44) != 0 {
            return Err(field("flags", format!("unknown flags {:#x}", u32_at(44))));
        }
        if !valid_cluster_size(u32_at(72)) {
            return Err(field(
                "cluster size",
                format!("{} is not a power of two in 4096..=2097152", u32_at(72)),
            ));
        }
        if b[76..128].iter().any(|&c| c != 0) || b[3264..CHECKSUM_AT].iter().any(|&c| c != 0) {
            return Err(field("reserved", "reserved bytes are not zero"));
        }
        let mut regions = Vec::with_capacity(count);
        for i in 0..MAX_REGIONS {
            let e = &b[TABLE_AT + i * ENTRY_SIZE..TABLE_AT + (i + 1) * ENTRY_SIZE];
            if i >= count {
                if e.iter().any(|&c| c != 0) {
                    return Err(field(
                        "region table",
                        format!("unused entry {i} is not zero"),
                    ));
                }
                continue;
            }
            let code = u16::from_le_bytes([e[0], e[1]]);
            let kind = RegionKind::from_code(code)
                .ok_or_else(|| field("region kind", format!("entry {i}: unknown kind {code}")))?;
            if e[4..8].iter().any(|&c| c != 0) || e[40..48].iter().any(|&c| c != 0) {
                return Err(field(
                    "region entry",
                    format!("entry {i}: reserved bytes not zero"),
                ));
            }
            regions.push(Region {
                kind,
                index: u16::from_le_bytes([e[2], e[3]]) as u32,
                offset: u64::from_le_bytes(e[8..16].try_into().expect("8 bytes")),
                length: u64::from_le_bytes(e[16..24].try_into().expect("8 bytes")),
                guid: Uuid::from_slice(&e[24..40]).expect("16 bytes"),
            });
        }
        let label = Label {
            generation: u64_at(16),
            uuid: Uuid::from_slice(&b[24..40]).expect("16 bytes"),
            layout,
            name,
            lun_size: u64_at(48),
            cluster_size: u32_at(72),
            created: u64_at(56),
            updated: u64_at(64),
            regions,
        };
        label.validate()?;
        Ok(label)
    }

    /// Check every invariant of the region table. Used on decode and before
    /// any label is written, so an invalid table never reaches the disk.
    pub fn validate(&self) -> Result<(), LabelError> {
        super::validate_name(&self.name).map_err(|e| field("name", e))?;
        if !valid_cluster_size(self.cluster_size) {
            return Err(field(
                "cluster size",
                format!(
                    "{} is not a power of two in 4096..=2097152",
                    self.cluster_size
                ),
            ));
        }
        if self.regions.len() < 3 || self.regions.len() > MAX_REGIONS {
            return Err(field(
                "region count",
                format!("{} not in 3..={MAX_REGIONS}", self.regions.len()),
            ));
        }
        if self.lun_size % ALIGN != 0 || self.lun_size == 0 {
            return Err(field(
                "LUN size",
                format!("{} is not a non-zero multiple of 1 MiB", self.lun_size),
            ));
        }
        for r in &self.regions {
            let bad = |why: &str| LabelError::Region {
                region: r.name(),
                offset: r.offset,
                length: r.length,
                why: why.to_string(),
            };
            if r.length == 0 {
                return Err(bad("is empty"));
            }
            if r.offset % ALIGN != 0 || r.length % ALIGN != 0 {
                return Err(bad("is not 1 MiB aligned"));
            }
            match r.offset.checked_add(r.length) {
                None => return Err(bad("overflows a 64-bit offset")),
                Some(end) if end > self.lun_size => {
                    return Err(bad(&format!("ends past the LUN size {}", self.lun_size)))
                }
                _ => {}
            }
            if r.kind != RegionKind::Disk && r.index != 0 {
                return Err(bad("has a non-zero index but is not a disk"));
            }
        }
        let count = |k| self.regions.iter().filter(|r| r.kind == k).count();
        if count(RegionKind::Label) != 1 || count(RegionKind::State) != 1 {
            return Err(field(
                "region table",
                "needs exactly one label and one state region",
            ));
        }
        let disks = count(RegionKind::Disk);
        if disks == 0 {
            return Err(field("region table", "has no disk region"));
        }
        for i in 0..disks as u32 {
            if self.region(RegionKind::Disk, i).is_none() {
                return Err(field(
                    "region table",
                    format!("disk indexes are not 0..{disks}: disk{i} is missing"),
                ));
            }
        }
        // In the aligned layout disk0 and the label region both start at 0:
        // the shadowed range is the label region for the host and the
        // shadow area's bytes for the guest. No other pair may overlap.
        let shadowed = |a: &Region, b: &Region| {
            self.layout == Layout::Aligned
                && matches!(
                    (a.kind, a.index, b.kind, b.index),
                    (RegionKind::Label, 0, RegionKind::Disk, 0)
                        | (RegionKind::Disk, 0, RegionKind::Label, 0)
                )
        };
        for (i, a) in self.regions.iter().enumerate() {
            for b in &self.regions[i + 1..] {
                if a.overlaps(b) && !shadowed(a, b) {
                    return Err(LabelError::Overlap {
                        a: format!("{} [{}, +{})", a.name(), a.offset, a.length),
                        b: format!("{} [{}, +{})", b.name(), b.offset, b.length),
                    });
                }
            }
        }
        let label = self.label_region();
        if label.length != LABEL_REGION_LEN {
            return Err(field(
                "label region",
                format!("length {} != 1 MiB", label.length),
            ));
        }
        if self.layout.has_gpt() {
            // The last MiB belongs to the backup GPT.
            let tail = self.lun_size - MIB;
            if let Some(r) = self.regions.iter().find(|r| r.end() > tail) {
                return Err(LabelError::Region {
                    region: r.name(),
                    offset: r.offset,
                    length: r.length,
                    why: "reaches into the backup GPT in the last MiB".into(),
                });
            }
        }
        match self.layout {
            Layout::Offset => {
                if label.offset != OFFSET_LABEL_AT {
                    return Err(field(
                        "label region",
                        format!("offset layout keeps it at 1 MiB, found {}", label.offset),
                    ));
                }
            }
            Layout::Aligned => {
                if label.offset != 0 {
                    return Err(field(
                        "label region",
                        format!(
                            "aligned layout keeps it in the first MiB, found {}",
                            label.offset
                        ),
                    ));
                }
                let disk0 = self.region(RegionKind::Disk, 0).expect("checked above");
                if disk0.offset != 0 || disk0.length <= SHADOW_LEN {
                    return Err(field(
                        "disk0",
                        format!(
                            "aligned layout needs disk0 at byte 0 and longer than the {SHADOW_LEN}-byte shadowed range, found [{}, +{})",
                            disk0.offset, disk0.length
                        ),
                    ));
                }
                let st = self.state_region();
                let need = super::state::data_start(Layout::Aligned);
                if st.length < need {
                    return Err(field(
                        "state region",
                        format!(
                            "{} bytes cannot hold the directory and the shadow area ({need} bytes)",
                            st.length
                        ),
                    ));
                }
            }
            Layout::Truncate => {
                let disk0 = self.region(RegionKind::Disk, 0).expect("checked above");
                if disk0.offset != 0 {
                    return Err(field("disk0", "truncate layout needs disk0 at byte 0"));
                }
                if label.end() != self.lun_size {
                    return Err(field(
                        "label region",
                        "truncate layout keeps the label in the last MiB",
                    ));
                }
            }
        }
        Ok(())
    }
}

/// [`Label::slot_offset`] of a label region at `region` in `layout`.
pub fn slot_offset(layout: Layout, region: u64, slot: u64) -> u64 {
    match layout {
        Layout::Aligned => region + ALIGNED_LABEL_SLOTS[usize::from(slot == 1)],
        Layout::Offset | Layout::Truncate => region + slot * LABEL_SLOT_STRIDE,
    }
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn sample(layout: Layout) -> Label {
        let r = |kind, index, offset, length| Region {
            kind,
            index,
            offset,
            length,
            // Distinct per region, even for the aligned layout's two
            // regions at 0.
            guid: Uuid::from_u128(0x1000 + offset as u128 + ((kind as u128) << 64)),
        };
        let regions = match layout {
            Layout::Offset => vec![
                r(RegionKind::Label, 0, MIB, MIB),
                r(RegionKind::State, 0, 2 * MIB, 8 * MIB),
                r(RegionKind::Disk, 0, 10 * MIB, 16 * MIB),
                r(RegionKind::Disk, 1, 26 * MIB, 4 * MIB),
            ],
            Layout::Truncate => vec![
                r(RegionKind::Label, 0, 29 * MIB, MIB),
                r(RegionKind::State, 0, 16 * MIB, 8 * MIB),
                r(RegionKind::Disk, 0, 0, 16 * MIB),
                r(RegionKind::Disk, 1, 24 * MIB, 4 * MIB),
            ],
            Layout::Aligned => vec![
                r(RegionKind::Label, 0, 0, MIB),
                r(RegionKind::State, 0, 16 * MIB, 8 * MIB),
                r(RegionKind::Disk, 0, 0, 16 * MIB),
                r(RegionKind::Disk, 1, 24 * MIB, 4 * MIB),
            ],
        };
        Label {
            generation: 7,
            uuid: Uuid::from_u128(0xabcdef),
            layout,
            name: "vm-1".into(),
            lun_size: match layout {
                Layout::Offset => 31 * MIB,
                Layout::Truncate | Layout::Aligned => 30 * MIB,
            },
            created: 1_700_000_000,
            updated: 1_700_000_001,
            cluster_size: 0,
            regions,
        }
    }

    #[test]
    fn cluster_size_round_trips_and_bad_values_are_refused() {
        let mut l = sample(Layout::Offset);
        assert_eq!(l.volume_cluster_size(), DEFAULT_CLUSTER_SIZE);
        l.cluster_size = 16 << 10;
        let d = Label::decode(&l.encode()).unwrap();
        assert_eq!(d.cluster_size, 16 << 10);
        assert_eq!(d.volume_cluster_size(), 16 << 10);
        for bad in [1u32, 3000, 2048, 4 << 20, u32::MAX] {
            l.cluster_size = bad;
            assert!(l.validate().is_err(), "{bad}");
            let e = Label::decode(&l.encode()).unwrap_err().to_string();
            assert!(e.contains("cluster size"), "{bad}: {e}");
        }
    }

    #[test]
    fn label_round_trips_in_every_layout() {
        for layout in Layout::ALL {
            let l = sample(layout);
            l.validate().unwrap();
            assert_eq!(Label::decode(&l.encode()).unwrap(), l);
        }
    }

    #[test]
    fn overlapping_regions_are_refused() {
        let mut l = sample(Layout::Offset);
        l.regions[3].offset = 20 * MIB;
        assert!(matches!(l.validate(), Err(LabelError::Overlap { .. })));
    }

    #[test]
    fn region_past_lun_end_is_refused() {
        let mut l = sample(Layout::Offset);
        l.regions[3].length = u64::MAX - MIB + 1;
        assert!(matches!(l.validate(), Err(LabelError::Region { .. })));
    }

    #[test]
    fn truncate_layout_needs_disk0_at_zero() {
        let mut l = sample(Layout::Truncate);
        l.regions[2].offset = MIB;
        l.regions[2].length = 15 * MIB;
        assert!(l.validate().is_err());
    }

    #[test]
    fn aligned_layout_shares_only_the_shadowed_range_between_label_and_disk0() {
        let l = sample(Layout::Aligned);
        l.validate().unwrap();
        assert_eq!(l.slot_offset(0), 256 << 10);
        assert_eq!(l.slot_offset(1), 768 << 10);
        // The label region stays in the first MiB.
        let mut bad = l.clone();
        bad.regions[0].offset = MIB;
        assert!(bad.validate().is_err());
        // Only disk0 may overlap it: the state region may not.
        let mut bad = l.clone();
        bad.regions[1].offset = 0;
        bad.regions[1].length = 8 * MIB;
        assert!(matches!(bad.validate(), Err(LabelError::Overlap { .. })));
        // disk0 must be longer than the shadowed range, at byte 0.
        let mut bad = l.clone();
        bad.regions[2].length = MIB;
        assert!(bad.validate().unwrap_err().to_string().contains("disk0"));
        // Nothing in the backup GPT's last MiB.
        let mut bad = l.clone();
        bad.regions[3].length = 6 * MIB;
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("backup GPT"));
        // An offset label with that table is refused (overlap).
        let mut bad = l.clone();
        bad.layout = Layout::Offset;
        assert!(bad.validate().is_err());
        // Old readers see an unknown layout code, not a different LUN.
        let mut b = l.encode();
        assert_eq!(b[40], 3);
        b[40] = 9;
        let sum = blake3::hash(&b[..CHECKSUM_AT]);
        b[CHECKSUM_AT..].copy_from_slice(sum.as_bytes());
        assert!(Label::decode(&b)
            .unwrap_err()
            .to_string()
            .contains("unknown code 9"));
    }

    #[test]
    fn short_or_foreign_input_is_not_a_label() {
        assert_eq!(Label::decode(&[0u8; 10]), Err(LabelError::NoMagic));
        assert_eq!(Label::decode(&[0u8; LABEL_SIZE]), Err(LabelError::NoMagic));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Every single-byte corruption of a label is detected.
        #[test]
        fn any_single_byte_corruption_is_detected(pos in 0usize..LABEL_SIZE, flip in 1u8..=255, layout in 0usize..3) {
            let l = sample(Layout::ALL[layout]);
            let mut b = l.encode();
            b[pos] ^= flip;
            prop_assert!(Label::decode(&b).is_err());
        }

        /// Decoding arbitrary bytes never panics.
        #[test]
        fn decode_never_panics(mut b in proptest::collection::vec(any::<u8>(), 0..5000), magic in any::<bool>()) {
            if magic && b.len() >= 8 { b[..8].copy_from_slice(MAGIC); }
            let _ = Label::decode(&b);
        }
    }
}
