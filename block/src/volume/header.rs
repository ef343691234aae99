//! The two-slot header of a delta layer file and the file's geometry.
//!
//! A delta file (`<layer-uuid>.delta`) is laid out as:
//!
//! ```text
//! 0      4096     8192 (rounded up to a cluster)
//! | hdr0 | hdr1 | ... | journal area 0 | journal area 1 | data clusters ...
//! ```
//!
//! Header slot (4096 bytes, little-endian; see docs/volumes.md):
//!
//! | off  | len  | field                                             |
//! |------|------|---------------------------------------------------|
//! | 0    | 8    | magic `LGDELTA\0`                                 |
//! | 8    | 2    | version (2)                                       |
//! | 10   | 2    | reserved, zero                                    |
//! | 12   | 4    | cluster size                                      |
//! | 16   | 8    | generation                                        |
//! | 24   | 16   | layer UUID                                        |
//! | 40   | 16   | parent layer UUID at creation (nil: none)         |
//! | 56   | 16   | LUN UUID owning the layers directory              |
//! | 72   | 8    | virtual size                                      |
//! | 80   | 8    | created, Unix seconds                             |
//! | 88   | 4    | flags: bit 0 frozen, bit 1 checksums, bit 2 spare; others zero |
//! | 92   | 4    | current journal area (0 or 1)                     |
//! | 96   | 8    | committed journal length in that area             |
//! | 104  | 8    | sequence number of the area's first record        |
//! | 112  | 8    | data start (must match the geometry)              |
//! | 120  | 8    | journal area length (must match the geometry)     |
//! | 128  | 2    | snapshot name length (0..=128)                    |
//! | 130  | 2    | description length (0..=1024)                     |
//! | 132  | 60   | reserved, zero                                    |
//! | 192  | 128  | snapshot name, UTF-8, zero padded                 |
//! | 320  | 1024 | description, UTF-8, zero padded                   |
//! | 1344 | 2720 | reserved, zero                                    |
//! | 4064 | 32   | blake3 of bytes 0..4064                           |

use thiserror::Error;
use uuid::Uuid;

pub const MAGIC: &[u8; 8] = b"LGDELTA\0";
/// Version 2 sized the journal areas for a data and a checksum entry per
/// cluster; version 1 (development builds before data checksums) had one.
pub const VERSION: u16 = 2;
pub const HEADER_SIZE: usize = 4096;
pub const NAME_MAX: usize = 128;
pub const DESC_MAX: usize = 1024;
const SUM_AT: usize = HEADER_SIZE - 32;

pub const FLAG_FROZEN: u32 = 1;
/// The layer keeps a checksum of every data cluster in its journal.
pub const FLAG_CHECKSUMS: u32 = 2;
/// Made ahead for a live snapshot and not yet named by a committed
/// manifest: nothing written into it was ever flushed (every flush makes
/// the snapshot durable first, and the flag is cleared right after the
/// manifest commit), so a spare no manifest names is removed on open. A
/// read-write open clears the flag on a layer the manifest does name (a
/// crash between that commit and the clearing).
pub const FLAG_SPARE: u32 = 4;

/// Where things live in a delta file; a pure function of cluster size and
/// virtual size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub cluster_size: u64,
    pub size: u64,
    pub clusters: u64,
    /// Offset of journal area 0; area 1 follows it.
    pub area0: u64,
    pub area_len: u64,
    /// Offset of physical cluster 0.
    pub data_start: u64,
}

fn align(v: u64, to: u64) -> Option<u64> {
    v.checked_add(to - 1).map(|x| x / to * to)
}

impl Geometry {
    /// `None` when the numbers overflow or the cluster size is invalid.
    pub fn new(cluster_size: u64, size: u64) -> Option<Geometry> {
        if !valid_cluster_size(cluster_size) {
            return None;
        }
        let clusters = size.div_ceil(cluster_size);
        let area0 = align(2 * HEADER_SIZE as u64, cluster_size)?;
        // An area holds a full compacted map (a data entry and a checksum
        // entry per cluster, for layers with checksums) with room to spare,
        // so after a compaction any batch of distinct entries still fits.
        let map_bytes =
            super::journal::encoded_len(usize::try_from(clusters.checked_mul(2)?).ok()?);
        let area_len = align(
            map_bytes.checked_mul(2)?.checked_add(1 << 20)?,
            cluster_size,
        )?;
        let data_start = area0.checked_add(area_len.checked_mul(2)?)?;
        // Every physical cluster index must fit the entry encoding.
        data_start.checked_add(clusters.checked_mul(cluster_size)?)?;
        Some(Geometry {
            cluster_size,
            size,
            clusters,
            area0,
            area_len,
            data_start,
        })
    }

    pub fn area_at(&self, area: u32) -> u64 {
        self.area0 + area as u64 * self.area_len
    }

    pub fn phys_offset(&self, phys: u64) -> u64 {
        self.data_start + phys * self.cluster_size
    }
}

/// 4 KiB ..= 2 MiB, a power of two.
pub fn valid_cluster_size(cs: u64) -> bool {
    cs.is_power_of_two() && (4096..=2 << 20).contains(&cs)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub cluster_size: u32,
    pub generation: u64,
    pub layer: Uuid,
    pub parent: Uuid,
    pub lun: Uuid,
    pub size: u64,
    pub created: u64,
    pub flags: u32,
    pub area: u32,
    pub journal_len: u64,
    pub first_seq: u64,
    pub name: String,
    pub description: String,
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum HeaderError {
    #[error("no delta header magic")]
    NoMagic,
    #[error("delta header checksum mismatch")]
    Checksum,
    #[error("unsupported delta header version {0} (this build reads version 2; version 1 came from development builds before data checksums and has a smaller journal area)")]
    Version(u16),
    #[error("delta header field {field} is invalid: {why}")]
    Field { field: &'static str, why: String },
}

impl Header {
    pub fn geometry(&self) -> Option<Geometry> {
        Geometry::new(self.cluster_size as u64, self.size)
    }

    pub fn frozen(&self) -> bool {
        self.flags & FLAG_FROZEN != 0
    }

    pub fn checksums(&self) -> bool {
        self.flags & FLAG_CHECKSUMS != 0
    }

    pub fn spare(&self) -> bool {
        self.flags & FLAG_SPARE != 0
    }

    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let g = self
            .geometry()
            .expect("headers are built from a valid geometry");
        let mut b = [0u8; HEADER_SIZE];
        b[0..8].copy_from_slice(MAGIC);
        b[8..10].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.cluster_size.to_le_bytes());
        b[16..24].copy_from_slice(&self.generation.to_le_bytes());
        b[24..40].copy_from_slice(self.layer.as_bytes());
        b[40..56].copy_from_slice(self.parent.as_bytes());
        b[56..72].copy_from_slice(self.lun.as_bytes());
        b[72..80].copy_from_slice(&self.size.to_le_bytes());
        b[80..88].copy_from_slice(&self.created.to_le_bytes());
        b[88..92].copy_from_slice(&self.flags.to_le_bytes());
        b[92..96].copy_from_slice(&self.area.to_le_bytes());
        b[96..104].copy_from_slice(&self.journal_len.to_le_bytes());
        b[104..112].copy_from_slice(&self.first_seq.to_le_bytes());
        b[112..120].copy_from_slice(&g.data_start.to_le_bytes());
        b[120..128].copy_from_slice(&g.area_len.to_le_bytes());
        let name = &self.name.as_bytes()[..self.name.len().min(NAME_MAX)];
        let desc = &self.description.as_bytes()[..self.description.len().min(DESC_MAX)];
        b[128..130].copy_from_slice(&(name.len() as u16).to_le_bytes());
        b[130..132].copy_from_slice(&(desc.len() as u16).to_le_bytes());
        b[192..192 + name.len()].copy_from_slice(name);
        b[320..320 + desc.len()].copy_from_slice(desc);
        let sum = blake3::hash(&b[..SUM_AT]);
        b[SUM_AT..].copy_from_slice(sum.as_bytes());
        b
    }

    /// Decode and validate one slot. Never panics.
    pub fn decode(b: &[u8]) -> Result<Header, HeaderError> {
        if b.len() < HEADER_SIZE || &b[0..8] != MAGIC {
            return Err(HeaderError::NoMagic);
        }
        let b = &b[..HEADER_SIZE];
        if blake3::hash(&b[..SUM_AT]).as_bytes() != &b[SUM_AT..] {
            return Err(HeaderError::Checksum);
        }
        let bad = |field, why: String| HeaderError::Field { field, why };
        let u16at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4"));
        let u64at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8"));
        let uuid = |o: usize| Uuid::from_slice(&b[o..o + 16]).expect("16 bytes");
        let version = u16at(8);
        if version != VERSION {
            return Err(HeaderError::Version(version));
        }
        if b[10..12] != [0, 0]
            || b[132..192].iter().any(|&c| c != 0)
            || b[1344..SUM_AT].iter().any(|&c| c != 0)
        {
            return Err(bad("reserved", "reserved bytes are not zero".into()));
        }
        let name_len = u16at(128) as usize;
        let desc_len = u16at(130) as usize;
        if name_len > NAME_MAX || desc_len > DESC_MAX {
            return Err(bad(
                "name",
                format!("name length {name_len} or description length {desc_len} too long"),
            ));
        }
        if b[192 + name_len..320].iter().any(|&c| c != 0)
            || b[320 + desc_len..1344].iter().any(|&c| c != 0)
        {
            return Err(bad("name", "bytes after the name are not zero".into()));
        }
        let text = |r: std::ops::Range<usize>, field| {
            std::str::from_utf8(&b[r])
                .map(str::to_string)
                .map_err(|_| bad(field, "not UTF-8".into()))
        };
        let h = Header {
            cluster_size: u32at(12),
            generation: u64at(16),
            layer: uuid(24),
            parent: uuid(40),
            lun: uuid(56),
            size: u64at(72),
            created: u64at(80),
            flags: u32at(88),
            area: u32at(92),
            journal_len: u64at(96),
            first_seq: u64at(104),
            name: text(192..192 + name_len, "name")?,
            description: text(320..320 + desc_len, "description")?,
        };
        let g = h.geometry().ok_or_else(|| {
            bad(
                "cluster size",
                format!(
                    "cluster size {} / virtual size {} invalid",
                    h.cluster_size, h.size
                ),
            )
        })?;
        if h.flags & !(FLAG_FROZEN | FLAG_CHECKSUMS | FLAG_SPARE) != 0 {
            return Err(bad("flags", format!("unknown flags {:#x}", h.flags)));
        }
        if h.area > 1 {
            return Err(bad("journal area", format!("{} is not 0 or 1", h.area)));
        }
        if h.journal_len > g.area_len {
            return Err(bad(
                "journal length",
                format!("{} exceeds the area length {}", h.journal_len, g.area_len),
            ));
        }
        if u64at(112) != g.data_start || u64at(120) != g.area_len {
            return Err(bad(
                "geometry",
                format!(
                    "data start {} / area length {} do not match the computed {} / {}",
                    u64at(112),
                    u64at(120),
                    g.data_start,
                    g.area_len
                ),
            ));
        }
        if h.layer.is_nil() {
            return Err(bad("layer", "nil layer UUID".into()));
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Header {
        Header {
            cluster_size: 65536,
            generation: 3,
            layer: Uuid::new_v4(),
            parent: Uuid::new_v4(),
            lun: Uuid::new_v4(),
            size: 1 << 30,
            created: 1_700_000_000,
            flags: FLAG_FROZEN,
            area: 1,
            journal_len: 4096,
            first_seq: 17,
            name: "before-upgrade".into(),
            description: "snapshot taken before the upgrade".into(),
        }
    }

    #[test]
    fn header_round_trips() {
        let h = sample();
        assert_eq!(Header::decode(&h.encode()).unwrap(), h);
    }

    #[test]
    fn every_single_byte_corruption_is_rejected() {
        let b = sample().encode();
        for i in 0..HEADER_SIZE {
            let mut c = b;
            c[i] ^= 0x5a;
            assert!(Header::decode(&c).is_err(), "byte {i} flip accepted");
        }
    }

    #[test]
    fn geometry_of_a_terabyte_volume_is_sane() {
        let g = Geometry::new(65536, 1 << 40).unwrap();
        assert_eq!(g.clusters, 1 << 24);
        assert_eq!(g.area0, 65536);
        assert!(g.area_len >= (1 << 24) * 32);
        assert_eq!(g.data_start % 65536, 0);
        assert!(Geometry::new(3000, 1 << 20).is_none());
        assert!(Geometry::new(4 << 20, 1 << 20).is_none());
    }
}
