//! The hidden state region: a checksummed directory of records.
//!
//! The region starts with two directory slots of 64 KiB each (A at 0, B at
//! 64 KiB); record payloads live in the data area from 128 KiB on. In the
//! `aligned` layout the 1 MiB from 128 KiB on is the *shadow area* (the
//! guest's own first MiB of disk0, written in place by the data path, not
//! a record) and the data area starts after it. Like the
//! label, the valid slot with the highest generation is current and an
//! update writes the other slot. Payloads are copy-on-write: a new version
//! of a record is written to space no current entry uses, made durable, and
//! only then does a new directory point at it.
//!
//! Directory slot (little-endian; see docs/lun-format.md):
//!
//! | off   | len | field                                        |
//! |-------|-----|----------------------------------------------|
//! | 0     | 8   | magic `LGSTATE\0`                            |
//! | 8     | 2   | version (1)                                  |
//! | 10    | 2   | reserved, zero                               |
//! | 12    | 4   | entry count (0..=1000)                       |
//! | 16    | 8   | generation                                   |
//! | 24    | 16  | LUN UUID (binds the directory to its LUN)    |
//! | 40    | 8   | state region length when written             |
//! | 48    | 16  | reserved, zero                               |
//! | 64    | …   | entries, 64 bytes each                       |
//! | 65504 | 32  | blake3 of bytes 0..65504                     |
//!
//! Entry (64 bytes): type u16, instance u16, flags u32, offset u64 (from the
//! start of the state region), length u64, reserved u64, blake3 of the
//! payload (32 bytes).

use thiserror::Error;
use uuid::Uuid;

use super::Layout;

// The record types and their JSON payloads are wire types, shared with the
// control API's clients (`vmm-shim`): they live in `lungate_api::records`.
pub use lungate_api::records::{
    CloneOrigin, Device, DiskIdentity, GuestService, HardwareConfig, Identity, MemoryExtent,
    MemoryMap, Owner, RecordType, SecondaryDisks, SecondaryRef, SnapshotNode, SnapshotTree,
};

pub const MAGIC: &[u8; 8] = b"LGSTATE\0";
pub const VERSION: u16 = 1;
pub const DIR_SLOT_SIZE: usize = 64 * 1024;
/// Where record payloads start, after both directory slots.
pub const DATA_START: u64 = 2 * DIR_SLOT_SIZE as u64;
/// In the `aligned` layout: where the shadow area (the guest's bytes of
/// the shadowed range, [`super::SHADOW_LEN`] long) starts in the state
/// region. It is part of the state region, so it is layered, snapshotted
/// and reverted with the VM like every record.
pub const SHADOW_AT: u64 = DATA_START;

/// Where record payloads start in a state region of `layout`: after the
/// directory slots, and in the `aligned` layout after the shadow area.
pub fn data_start(layout: Layout) -> u64 {
    match layout {
        Layout::Aligned => SHADOW_AT + super::SHADOW_LEN,
        Layout::Offset | Layout::Truncate => DATA_START,
    }
}
pub const MAX_ENTRIES: usize = 1000;
const ENTRIES_AT: usize = 64;
const ENTRY_SIZE: usize = 64;
const CHECKSUM_AT: usize = DIR_SLOT_SIZE - 32;

/// Room for vCPU and device state on top of the memory images.
pub const DEVICE_STATE_ROOM: u64 = 16 << 20;

/// Size of the state region for a VM with `memory` bytes of RAM: the
/// directory (and in the `aligned` layout the shadow area), two memory
/// images (so a new save never overwrites the last good one) and room for
/// vCPU/device state, rounded up to 1 MiB.
pub fn state_region_len(layout: Layout, memory: u64) -> Option<u64> {
    memory
        .checked_mul(2)?
        .checked_add(DEVICE_STATE_ROOM)?
        .checked_add(data_start(layout))
        .and_then(super::align_up)
}

/// One directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub rtype: RecordType,
    pub instance: u16,
    pub flags: u32,
    /// From the start of the state region.
    pub offset: u64,
    pub length: u64,
    pub checksum: [u8; 32],
}

impl Entry {
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.length)
    }
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DirError {
    #[error("no state directory magic")]
    NoMagic,
    #[error("state directory checksum mismatch")]
    Checksum,
    #[error("unsupported state directory version {0}")]
    Version(u16),
    #[error("state directory belongs to LUN {found}, not {expected}")]
    WrongLun { found: Uuid, expected: Uuid },
    #[error("state directory field {field} is invalid: {why}")]
    Field { field: &'static str, why: String },
}

/// A decoded directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Directory {
    pub generation: u64,
    pub lun: Uuid,
    pub region_len: u64,
    /// Where the data area starts ([`data_start`] of the LUN's layout; not
    /// stored in the slot: the label decides it).
    pub data_start: u64,
    pub entries: Vec<Entry>,
}

impl Directory {
    pub fn new(lun: Uuid, region_len: u64, data_start: u64) -> Directory {
        Directory {
            generation: 0,
            lun,
            region_len,
            data_start,
            entries: Vec::new(),
        }
    }

    pub fn find(&self, rtype: RecordType, instance: u16) -> Option<&Entry> {
        self.entries
            .iter()
            .find(|e| e.rtype == rtype && e.instance == instance)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; DIR_SLOT_SIZE];
        b[0..8].copy_from_slice(MAGIC);
        b[8..10].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(self.entries.len() as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.generation.to_le_bytes());
        b[24..40].copy_from_slice(self.lun.as_bytes());
        b[40..48].copy_from_slice(&self.region_len.to_le_bytes());
        for (i, e) in self.entries.iter().enumerate() {
            let o = ENTRIES_AT + i * ENTRY_SIZE;
            let d = &mut b[o..o + ENTRY_SIZE];
            d[0..2].copy_from_slice(&e.rtype.code().to_le_bytes());
            d[2..4].copy_from_slice(&e.instance.to_le_bytes());
            d[4..8].copy_from_slice(&e.flags.to_le_bytes());
            d[8..16].copy_from_slice(&e.offset.to_le_bytes());
            d[16..24].copy_from_slice(&e.length.to_le_bytes());
            d[32..64].copy_from_slice(&e.checksum);
        }
        let sum = blake3::hash(&b[..CHECKSUM_AT]);
        b[CHECKSUM_AT..].copy_from_slice(sum.as_bytes());
        b
    }

    /// Decode and validate a directory slot for LUN `lun` whose data area
    /// starts at `data_start` (see [`data_start`]). Never panics.
    pub fn decode(b: &[u8], lun: Uuid, data_start: u64) -> Result<Directory, DirError> {
        if b.len() < DIR_SLOT_SIZE || &b[0..8] != MAGIC {
            return Err(DirError::NoMagic);
        }
        let b = &b[..DIR_SLOT_SIZE];
        if blake3::hash(&b[..CHECKSUM_AT]).as_bytes() != &b[CHECKSUM_AT..] {
            return Err(DirError::Checksum);
        }
        let bad = |field, why: String| DirError::Field { field, why };
        let version = u16::from_le_bytes([b[8], b[9]]);
        if version != VERSION {
            return Err(DirError::Version(version));
        }
        if b[10..12] != [0, 0] || b[48..64].iter().any(|&c| c != 0) {
            return Err(bad("reserved", "reserved bytes are not zero".into()));
        }
        let count = u32::from_le_bytes(b[12..16].try_into().expect("4")) as usize;
        if count > MAX_ENTRIES {
            return Err(bad("entry count", format!("{count} > {MAX_ENTRIES}")));
        }
        let found = Uuid::from_slice(&b[24..40]).expect("16 bytes");
        if found != lun {
            return Err(DirError::WrongLun {
                found,
                expected: lun,
            });
        }
        let region_len = u64::from_le_bytes(b[40..48].try_into().expect("8"));
        let mut entries: Vec<Entry> = Vec::with_capacity(count);
        for i in 0..count {
            let o = ENTRIES_AT + i * ENTRY_SIZE;
            let d = &b[o..o + ENTRY_SIZE];
            let code = u16::from_le_bytes([d[0], d[1]]);
            let rtype = RecordType::from_code(code)
                .ok_or_else(|| bad("record type", format!("entry {i}: unknown type {code}")))?;
            if d[24..32].iter().any(|&c| c != 0) {
                return Err(bad("entry", format!("entry {i}: reserved bytes not zero")));
            }
            let e = Entry {
                rtype,
                instance: u16::from_le_bytes([d[2], d[3]]),
                flags: u32::from_le_bytes(d[4..8].try_into().expect("4")),
                offset: u64::from_le_bytes(d[8..16].try_into().expect("8")),
                length: u64::from_le_bytes(d[16..24].try_into().expect("8")),
                checksum: d[32..64].try_into().expect("32"),
            };
            let end = e.offset.checked_add(e.length);
            if e.offset < data_start || end.is_none_or(|end| end > region_len) {
                return Err(bad(
                    "entry",
                    format!(
                        "entry {i} ({}) [{}, +{}) is outside the data area [{data_start}, {region_len})",
                        rtype.name(),
                        e.offset,
                        e.length
                    ),
                ));
            }
            if entries
                .iter()
                .any(|x| x.rtype == e.rtype && x.instance == e.instance)
            {
                return Err(bad(
                    "entry",
                    format!("entry {i}: duplicate {} #{}", rtype.name(), e.instance),
                ));
            }
            if let Some(x) = entries
                .iter()
                .find(|x| x.length > 0 && e.length > 0 && x.offset < e.end() && e.offset < x.end())
            {
                return Err(bad(
                    "entry",
                    format!(
                        "entry {i} ({}) overlaps {} #{}",
                        rtype.name(),
                        x.rtype.name(),
                        x.instance
                    ),
                ));
            }
            entries.push(e);
        }
        if b[ENTRIES_AT + count * ENTRY_SIZE..CHECKSUM_AT]
            .iter()
            .any(|&c| c != 0)
        {
            return Err(bad(
                "entries",
                "bytes after the last entry are not zero".into(),
            ));
        }
        Ok(Directory {
            generation: u64::from_le_bytes(b[16..24].try_into().expect("8")),
            lun,
            region_len,
            data_start,
            entries,
        })
    }

    /// First-fit: the lowest offset in the data area where `len` bytes fit
    /// without touching any current entry. Returns `None` when full.
    pub fn allocate(&self, len: u64, region_len: u64) -> Option<u64> {
        let mut used: Vec<(u64, u64)> = self
            .entries
            .iter()
            .filter(|e| e.length > 0)
            .map(|e| (e.offset, e.end()))
            .collect();
        used.sort_unstable();
        let mut at = self.data_start;
        for (s, e) in used {
            if s >= at && s - at >= len {
                return Some(at);
            }
            at = at.max(e);
        }
        (region_len.checked_sub(at)? >= len).then_some(at)
    }

    /// Bytes of the data area referenced by entries.
    pub fn used_bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.length).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Directory {
        let mk = |rtype, instance, offset, length, fill: u8| Entry {
            rtype,
            instance,
            flags: 0,
            offset,
            length,
            checksum: [fill; 32],
        };
        Directory {
            generation: 3,
            lun: Uuid::from_u128(42),
            region_len: 8 << 20,
            data_start: DATA_START,
            entries: vec![
                mk(RecordType::HardwareConfig, 0, DATA_START, 100, 1),
                mk(RecordType::Identity, 0, DATA_START + 4096, 200, 2),
                mk(RecordType::VcpuState, 1, DATA_START + 8192, 0, 3),
            ],
        }
    }

    #[test]
    fn directory_round_trips() {
        let d = sample();
        assert_eq!(
            Directory::decode(&d.encode(), d.lun, DATA_START).unwrap(),
            d
        );
    }

    #[test]
    fn directory_of_another_lun_is_refused() {
        let d = sample();
        assert!(matches!(
            Directory::decode(&d.encode(), Uuid::from_u128(43), DATA_START),
            Err(DirError::WrongLun { .. })
        ));
    }

    #[test]
    fn allocate_finds_gaps_and_reports_full() {
        let d = sample();
        assert_eq!(d.allocate(1000, d.region_len), Some(DATA_START + 100));
        assert_eq!(
            d.allocate(4096, d.region_len),
            Some(DATA_START + 4096 + 200)
        );
        assert_eq!(d.allocate(16 << 20, d.region_len), None);
    }

    #[test]
    fn state_region_len_holds_two_images_and_rounds_up() {
        assert_eq!(state_region_len(Layout::Offset, 0), Some(17 << 20));
        assert_eq!(
            state_region_len(Layout::Truncate, 1 << 30),
            Some((2 << 30) + (17 << 20))
        );
        assert_eq!(state_region_len(Layout::Offset, u64::MAX), None);
        // The aligned layout adds the 1 MiB shadow area.
        assert_eq!(state_region_len(Layout::Aligned, 0), Some(18 << 20));
    }

    #[test]
    fn an_aligned_directory_keeps_records_out_of_the_shadow_area() {
        let start = data_start(Layout::Aligned);
        assert_eq!(start, SHADOW_AT + crate::format::SHADOW_LEN);
        let mut d = Directory::new(Uuid::from_u128(42), 8 << 20, start);
        assert_eq!(d.allocate(100, d.region_len), Some(start));
        d.entries.push(Entry {
            rtype: RecordType::HardwareConfig,
            instance: 0,
            flags: 0,
            offset: SHADOW_AT,
            length: 100,
            checksum: [0; 32],
        });
        // A directory naming a record inside the shadow area is refused
        // for an aligned LUN (the guest writes there), accepted elsewhere.
        let b = d.encode();
        let e = Directory::decode(&b, d.lun, start).unwrap_err().to_string();
        assert!(e.contains("outside the data area"), "{e}");
        assert!(Directory::decode(&b, d.lun, DATA_START).is_ok());
    }

    #[test]
    fn disk_identity_hex_parses() {
        let d = DiskIdentity {
            index: 0,
            id: "000102030405060708090a0b0c0d0e0f".into(),
            export_name: "a/disk0".into(),
            description: String::new(),
        };
        assert_eq!(d.id_bytes().unwrap()[15], 15);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]
        /// Every single-byte corruption of a directory slot is detected.
        #[test]
        fn any_single_byte_corruption_is_detected(pos in 0usize..DIR_SLOT_SIZE, flip in 1u8..=255) {
            let d = sample();
            let mut b = d.encode();
            b[pos] ^= flip;
            prop_assert!(Directory::decode(&b, d.lun, DATA_START).is_err());
        }

    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn decode_never_panics(mut b in proptest::collection::vec(any::<u8>(), 0..70000)) {
            if b.len() >= 8 { b[..8].copy_from_slice(MAGIC); }
            let _ = Directory::decode(&b, Uuid::from_u128(42), DATA_START);
        }
    }
}
