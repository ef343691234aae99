//! The on-disk format of a lungate LUN: constants, the label (region table),
//! the hidden state region's record directory and the GPT written for the
//! `offset` and `aligned` layouts. Everything here is pure encode/decode plus validation;
//! file I/O lives in [`crate::lun`]. The byte-by-byte specification is
//! `docs/lun-format.md`; this module is its reference implementation.

pub mod gpt;
pub mod label;
pub mod state;

use std::fmt;
use std::str::FromStr;

use uuid::Uuid;

/// One mebibyte: every region offset and length is a multiple of it.
pub const MIB: u64 = 1 << 20;
/// Region alignment.
pub const ALIGN: u64 = MIB;
/// Logical sector size of a LUN (GPT LBAs are in these units).
pub const SECTOR: u64 = 512;

/// Size of the label region (both label slots).
pub const LABEL_REGION_LEN: u64 = MIB;
/// Offset of the second label slot inside the label region.
pub const LABEL_SLOT_STRIDE: u64 = 512 * 1024;
/// In the `offset` layout the label region sits at this fixed offset, right
/// after the primary GPT.
pub const OFFSET_LABEL_AT: u64 = MIB;
/// In the `offset` and `aligned` layouts the last MiB of the LUN holds the
/// backup GPT.
pub const OFFSET_TAIL_RESERVED: u64 = MIB;
/// In the `aligned` layout the guest's bytes `[0, SHADOW_LEN)` of disk0 are
/// shadowed: the LUN keeps its protective MBR, GPT and label there, and the
/// guest's own bytes live in the shadow area of the state region
/// ([`state::SHADOW_AT`]).
pub const SHADOW_LEN: u64 = MIB;
/// In the `aligned` layout the label region is `[0, 1 MiB)` and its two
/// slots sit at these offsets (the first sectors hold the MBR and GPT).
pub const ALIGNED_LABEL_SLOTS: [u64; 2] = [256 << 10, 768 << 10];

/// GPT partition type of the label region.
pub const LABEL_TYPE_GUID: Uuid = Uuid::from_u128(0xedd3d04b_536b_4c9d_8de4_58105880c2a4);
/// GPT partition type of the hidden state region.
pub const STATE_TYPE_GUID: Uuid = Uuid::from_u128(0x8f5837b6_6c9e_4606_b7c3_16b56f2fa3a1);
/// GPT partition type of a disk region.
pub const DISK_TYPE_GUID: Uuid = Uuid::from_u128(0xbde3a7f4_a2ff_4516_bf62_06cd8fb7ff86);

/// Round `v` up to a multiple of [`ALIGN`]; `None` on overflow.
pub fn align_up(v: u64) -> Option<u64> {
    v.checked_add(ALIGN - 1).map(|x| x & !(ALIGN - 1))
}

/// How the disk regions are laid out in the LUN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// A real GPT describes every region; the guest sees a disk region at an offset.
    Offset,
    /// Disk 0 starts at byte 0; state and a footer label live past its end.
    Truncate,
    /// Disk 0 starts at byte 0 and every guest block is the LUN block of the
    /// same number, but for the first MiB: there the LUN keeps its own GPT
    /// and label, and the guest's bytes live in the state region's shadow
    /// area.
    Aligned,
}

impl Layout {
    pub const ALL: [Layout; 3] = [Layout::Offset, Layout::Truncate, Layout::Aligned];

    pub(crate) fn code(self) -> u8 {
        match self {
            Layout::Offset => 1,
            Layout::Truncate => 2,
            Layout::Aligned => 3,
        }
    }

    pub(crate) fn from_code(c: u8) -> Option<Layout> {
        match c {
            1 => Some(Layout::Offset),
            2 => Some(Layout::Truncate),
            3 => Some(Layout::Aligned),
            _ => None,
        }
    }

    /// Whether the LUN carries lungate's GPT (primary at LBA 0–33, backup
    /// in the last MiB).
    pub fn has_gpt(self) -> bool {
        matches!(self, Layout::Offset | Layout::Aligned)
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Layout::Offset => "offset",
            Layout::Truncate => "truncate",
            Layout::Aligned => "aligned",
        })
    }
}

impl FromStr for Layout {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "offset" => Ok(Layout::Offset),
            "truncate" => Ok(Layout::Truncate),
            "aligned" => Ok(Layout::Aligned),
            other => Err(format!(
                "unknown layout {other:?}: expected \"offset\", \"truncate\" or \"aligned\""
            )),
        }
    }
}

/// What a region holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RegionKind {
    Label,
    State,
    Disk,
}

impl RegionKind {
    pub(crate) fn code(self) -> u16 {
        match self {
            RegionKind::Label => 1,
            RegionKind::State => 2,
            RegionKind::Disk => 3,
        }
    }

    pub(crate) fn from_code(c: u16) -> Option<RegionKind> {
        match c {
            1 => Some(RegionKind::Label),
            2 => Some(RegionKind::State),
            3 => Some(RegionKind::Disk),
            _ => None,
        }
    }

    /// The GPT partition type of this kind of region.
    pub fn type_guid(self) -> Uuid {
        match self {
            RegionKind::Label => LABEL_TYPE_GUID,
            RegionKind::State => STATE_TYPE_GUID,
            RegionKind::Disk => DISK_TYPE_GUID,
        }
    }
}

impl fmt::Display for RegionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RegionKind::Label => "label",
            RegionKind::State => "state",
            RegionKind::Disk => "disk",
        })
    }
}

/// One entry of the region table: a byte range of the backing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Region {
    pub kind: RegionKind,
    /// Disk number for disk regions (disk0, disk1, …); 0 for the others.
    pub index: u32,
    /// Byte offset in the backing file.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// Unique id of the region (the GPT partition GUID in the offset layout).
    #[serde(serialize_with = "ser_uuid")]
    pub guid: Uuid,
}

fn ser_uuid<S: serde::Serializer>(u: &Uuid, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(u)
}

impl Region {
    /// One past the last byte; regions are validated so this cannot overflow.
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.length)
    }

    /// Whether two regions share at least one byte.
    pub fn overlaps(&self, other: &Region) -> bool {
        self.offset < other.end() && other.offset < self.end()
    }

    /// Human name: `label`, `state`, `disk0`, `disk1`, …
    pub fn name(&self) -> String {
        match self.kind {
            RegionKind::Disk => format!("disk{}", self.index),
            k => k.to_string(),
        }
    }
}

/// VM names become export names (`NAME/disk0`) and file names (`NAME.lun`).
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > label::NAME_MAX {
        return Err(format!(
            "VM name {name:?} must be 1 to {} bytes long",
            label::NAME_MAX
        ));
    }
    if name.starts_with(['.', '-']) {
        return Err(format!("VM name {name:?} must not start with '.' or '-'"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "VM name {name:?} contains {c:?}: only ASCII letters, digits, '.', '_' and '-' are allowed"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn align_up_rounds_and_detects_overflow() {
        assert_eq!(align_up(0), Some(0));
        assert_eq!(align_up(1), Some(MIB));
        assert_eq!(align_up(MIB), Some(MIB));
        assert_eq!(align_up(u64::MAX), None);
    }

    #[test]
    fn names_are_restricted_to_export_safe_characters() {
        assert!(validate_name("web-01.prod_a").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("a/b").is_err());
        assert!(validate_name("-x").is_err());
        assert!(validate_name(&"x".repeat(65)).is_err());
    }

    #[test]
    fn type_guids_are_distinct() {
        assert_ne!(LABEL_TYPE_GUID, STATE_TYPE_GUID);
        assert_ne!(STATE_TYPE_GUID, DISK_TYPE_GUID);
        assert_eq!(
            DISK_TYPE_GUID.to_string(),
            "bde3a7f4-a2ff-4516-bf62-06cd8fb7ff86"
        );
    }
}
