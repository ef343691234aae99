//! The GPT of the `offset` and `aligned` layouts, written and read with the
//! `gpt` crate.
//!
//! The GPT is derived from the label: one partition per region, typed with
//! lungate's partition-type GUIDs, so hosts (`sfdisk`, `blkid`) recognise a
//! LUN. The label stays the source of truth; a GPT that disagrees with it is
//! reported and rewritten from the label.
//!
//! In the `aligned` layout two regions start inside the GPT's own sectors,
//! so their partitions describe only the part of the region that holds
//! what the partition names: `lungate-label` covers the label slots
//! (`[256 KiB, 1 MiB)`), `lungate-disk0` the part of disk0 that sits at its
//! own offset (`[1 MiB, end)`; the shadowed first MiB lives in the state
//! region). [`partitions`] is that mapping, for writing and checking alike.

use std::collections::BTreeMap;
use std::io::{self, Read, Seek, SeekFrom, Write};

use gpt::disk::LogicalBlockSize;
use gpt::partition::Partition;
use gpt::partition_types::{OperatingSystem, Type};
use lungate_block::store::Object;
use uuid::Uuid;

use super::label::Label;
use super::{Layout, Region, RegionKind, ALIGNED_LABEL_SLOTS, SECTOR, SHADOW_LEN};

/// Number of partition entries, as every common tool writes.
const ENTRIES: u32 = 128;

/// A `Read + Write + Seek` view of the first `len` bytes of a LUN's bytes
/// (a file, a block device or an RBD image), so the
/// `gpt` crate puts the backup GPT at the end of the LUN, not the end of a
/// larger block device.
pub(crate) struct Window<'a> {
    file: &'a dyn Object,
    len: u64,
    pos: u64,
}

impl std::fmt::Debug for Window<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Window")
            .field("object", &self.file.name())
            .field("len", &self.len)
            .field("pos", &self.pos)
            .finish()
    }
}

impl<'a> Window<'a> {
    pub(crate) fn new(file: &'a dyn Object, len: u64) -> Self {
        Window { file, len, pos: 0 }
    }
}

impl Read for Window<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.len.saturating_sub(self.pos);
        let n = (buf.len() as u64).min(left) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.file.read_at(&mut buf[..n], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Write for Window<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let end = self.pos.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "GPT write at {} + {} past LUN end {}",
                    self.pos,
                    buf.len(),
                    self.len
                ),
            ));
        }
        self.file.write_at(buf, self.pos)?;
        self.pos += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Seek for Window<'_> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let new = match pos {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = new.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "bad seek"))?;
        Ok(self.pos)
    }
}

fn gpt_err(e: gpt::GptError) -> io::Error {
    io::Error::other(format!("GPT: {e}"))
}

fn part_type(kind: RegionKind) -> Type {
    Type {
        guid: kind.type_guid(),
        os: OperatingSystem::Custom("lungate".into()),
    }
}

/// Partition name of a region: `lungate-label`, `lungate-state`, `lungate-disk0`…
pub fn partition_name(r: &Region) -> String {
    format!("lungate-{}", r.name())
}

fn partition_id(r: &Region) -> u32 {
    match r.kind {
        RegionKind::Label => 1,
        RegionKind::State => 2,
        RegionKind::Disk => 3 + r.index,
    }
}

/// The partitions the GPT of `label` holds: one per region, each with its
/// partition number (1-based), in region-table order.
pub fn partitions(label: &Label) -> Vec<(u32, GptPartition)> {
    label
        .regions
        .iter()
        .map(|r| {
            let (offset, end) = match (label.layout, r.kind, r.index) {
                (Layout::Aligned, RegionKind::Label, _) => (ALIGNED_LABEL_SLOTS[0], r.end()),
                (Layout::Aligned, RegionKind::Disk, 0) => (SHADOW_LEN, r.end()),
                _ => (r.offset, r.end()),
            };
            (
                partition_id(r),
                GptPartition {
                    type_guid: r.kind.type_guid(),
                    guid: r.guid,
                    offset,
                    length: end - offset,
                    name: partition_name(r),
                },
            )
        })
        .collect()
}

/// Write the protective MBR and both GPTs for `label` (offset and aligned
/// layouts), the backup at the end of the LUN.
pub fn write(file: &dyn Object, label: &Label) -> io::Result<()> {
    write_in(file, label, label.lun_size)
}

/// [`write`] with the backup GPT at `len` instead of the LUN's end: a grow
/// that extends the file first keeps the current partitions and puts the
/// backup at the new end, so the new tail never reads as an unwritten
/// extension (see `Lun::find_label`).
pub fn write_in(file: &dyn Object, label: &Label, len: u64) -> io::Result<()> {
    let mut dev = Window::new(file, len);
    let sectors = len / SECTOR;
    let mbr = gpt::mbr::ProtectiveMBR::with_lb_size(u32::try_from(sectors - 1).unwrap_or(u32::MAX));
    mbr.overwrite_lba0(&mut dev)
        .map_err(|e| io::Error::other(format!("protective MBR: {e}")))?;
    let mut disk = gpt::GptConfig::new()
        .writable(true)
        .logical_block_size(LogicalBlockSize::Lb512)
        .change_partition_count(true)
        .create_from_device(dev, Some(label.uuid))
        .map_err(gpt_err)?;
    let mut parts = BTreeMap::new();
    for id in 1..=ENTRIES {
        parts.insert(id, Partition::zero());
    }
    for (r, (id, p)) in label.regions.iter().zip(partitions(label)) {
        parts.insert(
            id,
            Partition {
                part_type_guid: part_type(r.kind),
                part_guid: p.guid,
                first_lba: p.offset / SECTOR,
                last_lba: (p.offset + p.length) / SECTOR - 1,
                flags: 0,
                name: p.name,
            },
        );
    }
    disk.update_partitions(parts).map_err(gpt_err)?;
    disk.write().map_err(gpt_err)?;
    Ok(())
}

/// A partition as read back from a GPT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GptPartition {
    pub type_guid: Uuid,
    pub guid: Uuid,
    pub offset: u64,
    pub length: u64,
    pub name: String,
}

/// Most partition entries a GPT header may claim before we refuse to parse
/// it: standard tables have 128; the `gpt` crate allocates the whole entry
/// array named by an (untrusted) header, so this bound keeps a crafted
/// header from making it allocate terabytes.
const MAX_SANE_ENTRIES: u32 = 4096;

/// Check the fields of both GPT headers that drive allocation before the
/// `gpt` crate sees them.
fn headers_sane(file: &dyn Object, len: u64) -> io::Result<()> {
    let last = (len / SECTOR).saturating_sub(1);
    for lba in [1, last] {
        let mut h = [0u8; 92];
        if lba == 0 || file.read_at(&mut h, lba * SECTOR).is_err() {
            continue;
        }
        if &h[0..8] != b"EFI PART" {
            continue;
        }
        let num = u32::from_le_bytes(h[80..84].try_into().expect("4 bytes"));
        let size = u32::from_le_bytes(h[84..88].try_into().expect("4 bytes"));
        if size != 128 || num > MAX_SANE_ENTRIES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("GPT header at LBA {lba} claims {num} entries of {size} bytes"),
            ));
        }
    }
    Ok(())
}

fn open(file: &dyn Object, len: u64) -> io::Result<gpt::GptDisk<Window<'_>>> {
    headers_sane(file, len)?;
    gpt::GptConfig::new()
        .writable(false)
        .logical_block_size(LogicalBlockSize::Lb512)
        .open_from_device(Window::new(file, len))
        .map_err(gpt_err)
}

fn used_partitions(disk: &gpt::GptDisk<Window<'_>>) -> Vec<GptPartition> {
    let mut out = Vec::new();
    for p in disk.partitions().values().filter(|p| p.is_used()) {
        let (Some(offset), Some(end)) = (
            p.first_lba.checked_mul(SECTOR),
            p.last_lba
                .checked_add(1)
                .and_then(|l| l.checked_mul(SECTOR)),
        ) else {
            continue;
        };
        out.push(GptPartition {
            type_guid: p.part_type_guid.guid,
            guid: p.part_guid,
            offset,
            length: end.saturating_sub(offset),
            name: p.name.clone(),
        });
    }
    out
}

/// Read the GPT of the first `len` bytes of `file` (the backup when the
/// primary is damaged). Read-only.
pub fn read(file: &dyn Object, len: u64) -> io::Result<(Uuid, Vec<GptPartition>)> {
    let disk = open(file, len)?;
    Ok((*disk.guid(), used_partitions(&disk)))
}

/// Everything wrong with `label`'s GPT in `file`: unreadable, a damaged
/// primary or backup header, or partitions that differ from the label.
/// Empty when the GPT is exactly what [`write`] writes.
pub fn check(file: &dyn Object, label: &Label) -> Vec<String> {
    let disk = match open(file, label.lun_size) {
        Ok(d) => d,
        Err(e) => return vec![format!("GPT unreadable: {e}")],
    };
    let mut out = Vec::new();
    if let Err(e) = disk.primary_header() {
        out.push(format!("primary GPT header at LBA 1 is damaged: {e}"));
    }
    if let Err(e) = disk.backup_header() {
        out.push(format!("backup GPT header at the last LBA is damaged: {e}"));
    }
    out.extend(diff(label, *disk.guid(), &used_partitions(&disk)));
    out
}

/// Differences between a GPT and the label it should mirror; empty when in sync.
pub fn diff(label: &Label, disk_guid: Uuid, parts: &[GptPartition]) -> Vec<String> {
    let mut out = Vec::new();
    if disk_guid != label.uuid {
        out.push(format!(
            "GPT disk GUID {disk_guid} != LUN UUID {}",
            label.uuid
        ));
    }
    for (_, want) in partitions(label) {
        match parts.iter().find(|p| p.guid == want.guid) {
            None => out.push(format!("GPT has no partition {}", want.name)),
            Some(p) => {
                if p.type_guid != want.type_guid
                    || p.offset != want.offset
                    || p.length != want.length
                {
                    out.push(format!(
                        "GPT partition {} is [{}, +{}) type {}, label says [{}, +{}) type {}",
                        p.name,
                        p.offset,
                        p.length,
                        p.type_guid,
                        want.offset,
                        want.length,
                        want.type_guid
                    ));
                }
            }
        }
    }
    if parts.len() != label.regions.len() {
        out.push(format!(
            "GPT has {} partitions, label has {} regions",
            parts.len(),
            label.regions.len()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::label::tests::sample;
    use crate::format::Layout;
    use lungate_block::store::file::FileObject;
    use std::os::unix::fs::FileExt;

    fn obj(f: &std::fs::File) -> FileObject {
        FileObject::new(
            "t".into(),
            std::sync::Arc::new(f.try_clone().unwrap()),
            None,
        )
    }

    #[test]
    fn gpt_round_trips_and_matches_the_label() {
        for layout in [Layout::Offset, Layout::Aligned] {
            let f = tempfile::tempfile().unwrap();
            let l = sample(layout);
            f.set_len(l.lun_size).unwrap();
            write(&obj(&f), &l).unwrap();
            let (guid, parts) = read(&obj(&f), l.lun_size).unwrap();
            assert_eq!(guid, l.uuid);
            assert!(
                diff(&l, guid, &parts).is_empty(),
                "{:?}",
                diff(&l, guid, &parts)
            );
            let disk1 = parts.iter().find(|p| p.name == "lungate-disk1").unwrap();
            assert_eq!(disk1.type_guid, crate::format::DISK_TYPE_GUID);
            // What the GPT writes stays inside the first 34 sectors, clear
            // of the aligned layout's label slots.
            let mut slot = [0u8; 4096];
            f.read_exact_at(&mut slot, ALIGNED_LABEL_SLOTS[0]).unwrap();
            assert!(slot.iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn aligned_gpt_names_the_label_slots_and_the_unshadowed_part_of_disk0() {
        let f = tempfile::tempfile().unwrap();
        let l = sample(Layout::Aligned);
        f.set_len(l.lun_size).unwrap();
        write(&obj(&f), &l).unwrap();
        let (_, parts) = read(&obj(&f), l.lun_size).unwrap();
        let get = |n: &str| parts.iter().find(|p| p.name == n).unwrap().clone();
        assert_eq!(
            (get("lungate-label").offset, get("lungate-label").length),
            (256 << 10, 768 << 10)
        );
        let disk0 = get("lungate-disk0");
        assert_eq!((disk0.offset, disk0.length), (SHADOW_LEN, 15 << 20));
        // A GPT that says disk0 starts at 0 is not this label's.
        let mut moved = parts.clone();
        moved
            .iter_mut()
            .find(|p| p.name == "lungate-disk0")
            .unwrap()
            .offset = 0;
        assert_eq!(diff(&l, l.uuid, &moved).len(), 1);
    }

    fn crc32(b: &[u8]) -> u32 {
        let mut c = !0u32;
        for &x in b {
            c ^= x as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0xEDB8_8320
                } else {
                    c >> 1
                };
            }
        }
        !c
    }

    #[test]
    fn check_reports_a_lost_primary_the_backup_still_describes() {
        let f = tempfile::tempfile().unwrap();
        let l = sample(Layout::Aligned);
        f.set_len(l.lun_size).unwrap();
        write(&obj(&f), &l).unwrap();
        assert!(check(&obj(&f), &l).is_empty(), "{:?}", check(&obj(&f), &l));
        f.write_all_at(&[0u8; 512], SECTOR).unwrap();
        let (guid, parts) = read(&obj(&f), l.lun_size).unwrap();
        assert!(diff(&l, guid, &parts).is_empty(), "the backup is read");
        let c = check(&obj(&f), &l);
        assert!(c.len() == 1 && c[0].contains("primary GPT header"), "{c:?}");
    }

    #[test]
    fn absurd_entry_count_is_refused_before_the_gpt_crate_allocates() {
        let f = tempfile::tempfile().unwrap();
        let l = sample(Layout::Offset);
        f.set_len(l.lun_size).unwrap();
        write(&obj(&f), &l).unwrap();
        for lba in [1, l.lun_size / SECTOR - 1] {
            let mut h = [0u8; 92];
            f.read_exact_at(&mut h, lba * SECTOR).unwrap();
            h[80..84].copy_from_slice(&u32::MAX.to_le_bytes());
            h[84..88].copy_from_slice(&256u32.to_le_bytes());
            h[16..20].copy_from_slice(&[0; 4]);
            let crc = crc32(&h);
            h[16..20].copy_from_slice(&crc.to_le_bytes());
            f.write_all_at(&h, lba * SECTOR).unwrap();
        }
        let e = read(&obj(&f), l.lun_size).unwrap_err();
        assert!(e.to_string().contains("claims 4294967295 entries"), "{e}");
    }

    #[test]
    fn gpt_of_a_larger_device_puts_backup_at_the_lun_end() {
        let f = tempfile::tempfile().unwrap();
        let l = sample(Layout::Offset);
        f.set_len(l.lun_size * 2).unwrap();
        write(&obj(&f), &l).unwrap();
        let mut last = [0u8; 8];
        f.read_exact_at(&mut last, l.lun_size - SECTOR).unwrap();
        assert_eq!(&last, b"EFI PART");
    }
}
