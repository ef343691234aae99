//! Save and restore of the whole VM as state records in the LUN's hidden
//! region, through the gateway's control API (docs/vmm-shim.md, *State
//! records*). This module turns a paused VM into one record batch and a
//! batch back into a VM's memory and vCPU state; the controller decides
//! when (pausing, the group snapshot, the revert).
//!
//! Records a save writes, in one directory commit:
//!
//! * `device-state #0`: the [`Machine`] record (JSON): hardware, CPUID,
//!   MSR list, KVM clock, the state service, events for the guest restored
//!   to this point, the highest guest page holding data;
//! * `vcpu-state #i`: each vCPU ([`crate::vcpu::VcpuState::encode`]);
//! * `memory-map #0`: which image holds each guest page ([`PageMap`]);
//!   pages in no extent are zero;
//! * `memory-image #k`: the pages this save wrote. The first save after a
//!   boot writes every page that holds data; later ones only the pages the
//!   guest (KVM's dirty log) or the shim's devices wrote since the last
//!   save or restore, and the map points the other pages at the older
//!   images. When the images would outgrow the memory size a save writes
//!   every page again into one new image (a full save) and drops the rest.
//!
//! Memory streams both ways in 1 MiB pieces; a save reads guest memory
//! twice (once to find zero pages and size the image, once to send it) and
//! never copies it whole.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;

use lungate_api::client::Client;
use lungate_api::records::{MemoryExtent, MemoryMap, RecordType};
use lungate_api::types::{RecordBatch, RecordPut, RecordRef};

use crate::layout::PAGE;
use crate::memory::GuestRam;
use crate::state::{Event, ServiceState};
use crate::vcpu::VcpuState;
use crate::vm::CpuidEntry;

/// Every snapshot a save takes has a description starting with this, so
/// `list` tells VM saves from plain disk snapshots.
pub const SAVE_PREFIX: &str = "vmm-shim save";

/// Record instances.
pub const MACHINE: u16 = 0;

/// The machine record (`device-state #0`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Machine {
    pub version: u32,
    pub memory_bytes: u64,
    pub vcpus: u32,
    pub cpuid: Vec<CpuidEntry>,
    pub msrs: Vec<u32>,
    /// `kvm_clock_data.clock`: the guest's kvmclock, ns.
    pub clock_ns: u64,
    pub service: ServiceState,
    /// Events for the guest restored to (or resumed at) this point: the
    /// completion of the save that made it, marked after-restore.
    pub after_restore: Vec<Event>,
    /// End of the highest guest page that holds data.
    pub used_bytes: u64,
    /// Unix seconds.
    pub saved_at: u64,
    /// Set by the last save of `vmm-shim migrate`: when the source paused
    /// the guest, Unix ns. The shim that resumes it reports the guest's
    /// downtime from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migrated_at_ns: Option<u64>,
}

/// Guest page → (image instance, byte offset in the image); `None` = zero.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageMap {
    pub pages: Vec<Option<(u16, u64)>>,
}

impl PageMap {
    pub fn zero(pages: u64) -> PageMap {
        PageMap {
            pages: vec![None; pages as usize],
        }
    }

    /// From a `memory-map` record; every extent page-aligned and inside
    /// `pages` pages.
    pub fn from_record(m: &MemoryMap, pages: u64) -> Result<PageMap, String> {
        let mut map = PageMap::zero(pages);
        for x in &m.extents {
            if x.guest_addr % PAGE != 0 || x.length % PAGE != 0 || x.image_offset % PAGE != 0 {
                return Err(format!("memory-map extent {x:?} is not page-aligned"));
            }
            let first = x.guest_addr / PAGE;
            let n = x.length / PAGE;
            if first.checked_add(n).is_none_or(|e| e > pages) {
                return Err(format!(
                    "memory-map extent at {:#x} + {} runs past {} pages",
                    x.guest_addr, x.length, pages
                ));
            }
            for i in 0..n {
                map.pages[(first + i) as usize] = Some((x.image, x.image_offset + i * PAGE));
            }
        }
        Ok(map)
    }

    /// The record: runs of pages contiguous in guest memory and in one image.
    pub fn to_record(&self) -> MemoryMap {
        let mut extents: Vec<MemoryExtent> = Vec::new();
        for (p, e) in self.pages.iter().enumerate() {
            let Some((image, off)) = *e else { continue };
            let addr = p as u64 * PAGE;
            if let Some(last) = extents.last_mut() {
                if last.image == image
                    && last.guest_addr + last.length == addr
                    && last.image_offset + last.length == off
                {
                    last.length += PAGE;
                    continue;
                }
            }
            extents.push(MemoryExtent {
                guest_addr: addr,
                length: PAGE,
                image,
                image_offset: off,
            });
        }
        MemoryMap { extents }
    }

    /// Bytes each image holds that the map still uses.
    pub fn images(&self) -> BTreeSet<u16> {
        self.pages.iter().flatten().map(|(i, _)| *i).collect()
    }

    pub fn used_bytes(&self) -> u64 {
        self.pages
            .iter()
            .rposition(Option::is_some)
            .map(|p| (p as u64 + 1) * PAGE)
            .unwrap_or(0)
    }

    /// Grow (zero pages) or cut to `pages`.
    pub fn resize(&mut self, pages: u64) {
        self.pages.resize(pages as usize, None);
    }
}

/// What the live state region holds that the next save builds on.
#[derive(Debug, Clone)]
pub struct Baseline {
    pub map: PageMap,
    /// Image instance → its length.
    pub images: BTreeMap<u16, u64>,
}

/// What a save wrote.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct SaveStats {
    pub full: bool,
    pub pages_written: u64,
    pub image_bytes: u64,
    pub records_us: u64,
}

fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

fn bit(bitmap: &[u64], p: u64) -> bool {
    bitmap
        .get((p / 64) as usize)
        .is_some_and(|w| w & (1 << (p % 64)) != 0)
}

/// Send guest pages `pages` (ascending) into a memory-image record, in
/// their order, coalesced into runs of up to `chunk.len()` bytes.
fn send_pages(
    ram: &GuestRam,
    pages: &[u64],
    chunk: &mut [u8],
    sink: &mut lungate_api::client::RecordSink<'_>,
) -> std::io::Result<()> {
    let per_chunk = chunk.len() / PAGE as usize;
    let mut k = 0;
    while k < pages.len() {
        let mut run = 1;
        while k + run < pages.len() && pages[k + run] == pages[k] + run as u64 && run < per_chunk {
            run += 1;
        }
        let len = run * PAGE as usize;
        ram.read(pages[k] * PAGE, &mut chunk[..len])
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        sink.write(&chunk[..len])?;
        k += run;
    }
    Ok(())
}

/// A paused VM as a save sees it.
pub struct Paused<'a> {
    pub ram: &'a GuestRam,
    pub vcpus: &'a [VcpuState],
    /// KVM's dirty log and the shim's own since the baseline, OR'ed.
    pub dirty: &'a [u64],
    /// vCPU records the live state holds (a restore onto fewer is refused,
    /// so this is at most `vcpus.len()`; kept for the removal below).
    pub old_vcpus: u32,
}

/// Write the records of a paused VM (`machine` with `used_bytes` still to
/// fill in) in one batch. Returns the new baseline.
pub fn write_state(
    client: &Client,
    lun: &str,
    vm: Paused<'_>,
    mut machine: Machine,
    baseline: Option<&Baseline>,
) -> Result<(Baseline, SaveStats), String> {
    let Paused {
        ram,
        vcpus,
        dirty,
        old_vcpus,
    } = vm;
    let t0 = std::time::Instant::now();
    let pages = ram.pages();
    let dirty_pages = (0..pages).filter(|&p| bit(dirty, p)).count() as u64;
    let full = match baseline {
        None => true,
        Some(b) => {
            // Images the map no longer uses are removed by this save, so
            // only the ones it still references count.
            let used = b.map.images();
            b.map.pages.len() as u64 != pages
                || b.images
                    .iter()
                    .filter(|(i, _)| used.contains(i))
                    .map(|(_, l)| l)
                    .sum::<u64>()
                    + dirty_pages * PAGE
                    > ram.size()
        }
    };
    let image = match baseline {
        Some(b) => (0..=u16::MAX)
            .find(|i| !b.images.contains_key(i))
            .ok_or("every memory-image instance is in use")?,
        None => 0,
    };
    let mut map = match (full, baseline) {
        (false, Some(b)) => b.map.clone(),
        _ => PageMap::zero(pages),
    };
    // Pass 1: which pages go into the new image (zero pages do not).
    let mut write: Vec<u64> = Vec::new();
    let mut chunk = vec![0u8; 1 << 20];
    let per_chunk = chunk.len() as u64 / PAGE;
    let mut p = 0u64;
    while p < pages {
        let n = per_chunk.min(pages - p);
        let want: Vec<u64> = (p..p + n).filter(|&q| full || bit(dirty, q)).collect();
        if !want.is_empty() {
            ram.read(p * PAGE, &mut chunk[..(n * PAGE) as usize])
                .map_err(|e| e.to_string())?;
            for q in want {
                let o = ((q - p) * PAGE) as usize;
                if is_zero(&chunk[o..o + PAGE as usize]) {
                    map.pages[q as usize] = None;
                } else {
                    map.pages[q as usize] = Some((image, write.len() as u64 * PAGE));
                    write.push(q);
                }
            }
        }
        p += n;
    }
    machine.used_bytes = map.used_bytes();
    let image_len = write.len() as u64 * PAGE;

    let referenced = map.images();
    let mut images: BTreeMap<u16, u64> = match (full, baseline) {
        (false, Some(b)) => b.images.clone(),
        _ => BTreeMap::new(),
    };
    if image_len > 0 {
        images.insert(image, image_len);
    }
    let mut remove: Vec<RecordRef> = Vec::new();
    if let Some(b) = baseline {
        for &i in b.images.keys() {
            if !referenced.contains(&i) {
                remove.push(RecordRef {
                    rtype: RecordType::MemoryImage,
                    instance: i,
                });
                images.remove(&i);
            }
        }
    }
    for i in vcpus.len() as u32..old_vcpus {
        remove.push(RecordRef {
            rtype: RecordType::VcpuState,
            instance: i as u16,
        });
    }

    let machine_json = serde_json::to_vec(&machine).expect("machine serialises");
    let map_json = serde_json::to_vec(&map.to_record()).expect("map serialises");
    let blobs: Vec<Vec<u8>> = vcpus.iter().map(VcpuState::encode).collect();
    let mut put = Vec::new();
    for v in vcpus {
        put.push(RecordPut {
            rtype: RecordType::VcpuState,
            instance: v.index as u16,
            length: blobs[v.index as usize].len() as u64,
        });
    }
    put.push(RecordPut {
        rtype: RecordType::DeviceState,
        instance: MACHINE,
        length: machine_json.len() as u64,
    });
    put.push(RecordPut {
        rtype: RecordType::MemoryMap,
        instance: 0,
        length: map_json.len() as u64,
    });
    if image_len > 0 {
        put.push(RecordPut {
            rtype: RecordType::MemoryImage,
            instance: image,
            length: image_len,
        });
    }
    let nv = vcpus.len();
    let batch = RecordBatch { put, remove };
    client
        .write_records(lun, &batch, |i, sink| {
            if i < nv {
                return sink.write(&blobs[i]);
            }
            match i - nv {
                0 => sink.write(&machine_json),
                1 => sink.write(&map_json),
                // Pass 2: the pages.
                _ => send_pages(ram, &write, &mut chunk, sink),
            }
        })
        .map_err(|e| e.to_string())?;
    let stats = SaveStats {
        full,
        pages_written: write.len() as u64,
        image_bytes: image_len,
        records_us: t0.elapsed().as_micros() as u64,
    };
    Ok((Baseline { map, images }, stats))
}

/// What a pre-copy round wrote.
#[derive(Debug, Clone, Copy, Default)]
pub struct PrecopyStats {
    pub pages_written: u64,
    pub image_bytes: u64,
}

/// One pre-copy round of a migration, **with the guest running**: write the
/// pages `dirty` marks (every page when `full`) into a memory-image
/// instance that neither `pending` nor the live records use, and point
/// `pending`'s map at it. The live records are not changed otherwise (no
/// map, no machine record), so a crash or a `run --resume` meanwhile still
/// finds the last save whole; the final [`write_state`] of the migration
/// takes `pending` as its baseline, writes what the guest dirtied since
/// this round (the caller fetched `dirty` before reading any page, so a
/// page written while it is read is dirty again), and removes the images
/// its map no longer needs.
pub fn precopy(
    client: &Client,
    lun: &str,
    ram: &GuestRam,
    dirty: &[u64],
    full: bool,
    pending: &mut Baseline,
) -> Result<PrecopyStats, String> {
    let pages = ram.pages();
    if pending.map.pages.len() as u64 != pages {
        return Err("the pre-copy map does not match the guest's memory".into());
    }
    let image = (0..=u16::MAX)
        .find(|i| !pending.images.contains_key(i))
        .ok_or("every memory-image instance is in use")?;
    let mut chunk = vec![0u8; 1 << 20];
    let per_chunk = chunk.len() as u64 / PAGE;
    let mut write: Vec<u64> = Vec::new();
    let mut zero: Vec<u64> = Vec::new();
    let mut p = 0u64;
    while p < pages {
        let n = per_chunk.min(pages - p);
        let want: Vec<u64> = (p..p + n).filter(|&q| full || bit(dirty, q)).collect();
        if !want.is_empty() {
            ram.read(p * PAGE, &mut chunk[..(n * PAGE) as usize])
                .map_err(|e| e.to_string())?;
            for q in want {
                let o = ((q - p) * PAGE) as usize;
                if is_zero(&chunk[o..o + PAGE as usize]) {
                    zero.push(q);
                } else {
                    write.push(q);
                }
            }
        }
        p += n;
    }
    let image_len = write.len() as u64 * PAGE;
    if image_len > 0 {
        // The image holds each page as it reads now, in `write` order: the
        // map below must describe exactly those bytes.
        let batch = RecordBatch {
            put: vec![RecordPut {
                rtype: RecordType::MemoryImage,
                instance: image,
                length: image_len,
            }],
            remove: vec![],
        };
        client
            .write_records(lun, &batch, |_, sink| {
                send_pages(ram, &write, &mut chunk, sink)
            })
            .map_err(|e| e.to_string())?;
        pending.images.insert(image, image_len);
    }
    // A page zero at the first read may be written before the image was:
    // it is dirty again, so the final save writes it.
    for q in zero {
        pending.map.pages[q as usize] = None;
    }
    for (k, q) in write.iter().enumerate() {
        pending.map.pages[*q as usize] = Some((image, k as u64 * PAGE));
    }
    Ok(PrecopyStats {
        pages_written: write.len() as u64,
        image_bytes: image_len,
    })
}

/// The saved state in the live records: machine, vCPUs and page map.
pub struct Saved {
    pub machine: Machine,
    pub vcpus: Vec<VcpuState>,
    pub map: MemoryMap,
    pub images: BTreeMap<u16, u64>,
}

fn need<T>(v: Option<T>, what: &str) -> Result<T, String> {
    v.ok_or_else(|| format!("the LUN's state region has no {what}: no VM state was saved here"))
}

/// Read the machine record of the live state region (`None`: no save).
pub fn read_machine(client: &Client, lun: &str) -> Result<Option<Machine>, String> {
    client
        .record_json::<Machine>(lun, RecordType::DeviceState, MACHINE)
        .map_err(|e| e.to_string())
}

/// Read the machine record as snapshot `snap` holds it.
pub fn read_machine_in(client: &Client, lun: &str, snap: &str) -> Result<Machine, String> {
    let b = client
        .snapshot_record(lun, snap, RecordType::DeviceState, MACHINE)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("snapshot {snap:?} holds no VM state (not a vmm-shim save)"))?;
    serde_json::from_slice(&b).map_err(|e| format!("snapshot {snap:?}: machine record: {e}"))
}

/// Read everything but memory from the live records.
pub fn read_saved(client: &Client, lun: &str) -> Result<Saved, String> {
    let machine = need(
        read_machine(client, lun)?,
        "machine record (device-state #0)",
    )?;
    let mut vcpus = Vec::new();
    for i in 0..machine.vcpus {
        let b = need(
            client
                .record(lun, RecordType::VcpuState, i as u16)
                .map_err(|e| e.to_string())?,
            &format!("vcpu-state #{i}"),
        )?;
        let v = VcpuState::decode(&b).map_err(|e| format!("vcpu-state #{i}: {e}"))?;
        if v.index != i {
            return Err(format!("vcpu-state #{i} holds vCPU {}", v.index));
        }
        vcpus.push(v);
    }
    let map: MemoryMap = need(
        client
            .record_json(lun, RecordType::MemoryMap, 0)
            .map_err(|e| e.to_string())?,
        "memory-map #0",
    )?;
    let records = client.records(lun).map_err(|e| e.to_string())?;
    let images = records
        .records
        .iter()
        .filter(|r| r.rtype == RecordType::MemoryImage)
        .map(|r| (r.instance, r.length))
        .collect();
    Ok(Saved {
        machine,
        vcpus,
        map,
        images,
    })
}

/// Load the saved memory into `ram` (pages past its end must be zero:
/// [`check_restore`] refused otherwise). Streams each image once.
pub fn load_memory(
    client: &Client,
    lun: &str,
    ram: &GuestRam,
    map: &MemoryMap,
) -> Result<u64, String> {
    let mut by_image: BTreeMap<u16, Vec<&MemoryExtent>> = BTreeMap::new();
    for x in &map.extents {
        if x.guest_addr
            .checked_add(x.length)
            .is_none_or(|e| e > ram.size())
        {
            return Err(format!(
                "memory-map extent at {:#x} + {} does not fit {} bytes of memory",
                x.guest_addr,
                x.length,
                ram.size()
            ));
        }
        by_image.entry(x.image).or_default().push(x);
    }
    let mut loaded = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    for (image, mut xs) in by_image {
        xs.sort_by_key(|x| x.image_offset);
        let mut r = client
            .record_reader(lun, RecordType::MemoryImage, image)
            .map_err(|e| e.to_string())?;
        let mut at = 0u64;
        for x in xs {
            if x.image_offset < at {
                return Err(format!(
                    "memory-image #{image}: extents overlap at {}",
                    x.image_offset
                ));
            }
            // Skip what no page uses any more.
            while at < x.image_offset {
                let n = (x.image_offset - at).min(buf.len() as u64) as usize;
                r.read_exact(&mut buf[..n])
                    .map_err(|e| format!("memory-image #{image}: {e}"))?;
                at += n as u64;
            }
            let mut done = 0u64;
            while done < x.length {
                let n = (x.length - done).min(buf.len() as u64) as usize;
                r.read_exact(&mut buf[..n])
                    .map_err(|e| format!("memory-image #{image}: {e}"))?;
                ram.load(x.guest_addr + done, &buf[..n])
                    .map_err(|e| e.to_string())?;
                done += n as u64;
            }
            at += x.length;
            loaded += x.length;
        }
        // Read to the end: the reader checks the image's blake3 there.
        std::io::copy(&mut r, &mut std::io::sink())
            .map_err(|e| format!("memory-image #{image}: {e}"))?;
    }
    Ok(loaded)
}

/// CPUID registers that carry feature bits, and names for the bits a
/// payload-class guest is most likely to rely on.
const FEATURE_REGS: [(u32, u32, &str); 7] = [
    (1, 0, "ecx"),
    (1, 0, "edx"),
    (7, 0, "ebx"),
    (7, 0, "ecx"),
    (7, 0, "edx"),
    (0x8000_0001, 0, "ecx"),
    (0x8000_0001, 0, "edx"),
];

fn feature_name(leaf: u32, reg: &str, b: u32) -> Option<&'static str> {
    Some(match (leaf, reg, b) {
        (1, "ecx", 0) => "sse3",
        (1, "ecx", 9) => "ssse3",
        (1, "ecx", 19) => "sse4.1",
        (1, "ecx", 20) => "sse4.2",
        (1, "ecx", 25) => "aes",
        (1, "ecx", 26) => "xsave",
        (1, "ecx", 28) => "avx",
        (1, "ecx", 30) => "rdrand",
        (1, "edx", 25) => "sse",
        (1, "edx", 26) => "sse2",
        (7, "ebx", 3) => "bmi1",
        (7, "ebx", 5) => "avx2",
        (7, "ebx", 8) => "bmi2",
        (7, "ebx", 16) => "avx512f",
        (7, "ebx", 18) => "rdseed",
        (7, "ebx", 29) => "sha",
        (0x8000_0001, "edx", 29) => "lm",
        (0x8000_0001, "ecx", 5) => "lzcnt",
        _ => return None,
    })
}

fn reg(e: &CpuidEntry, r: &str) -> u32 {
    match r {
        "eax" => e.eax,
        "ebx" => e.ebx,
        "ecx" => e.ecx,
        _ => e.edx,
    }
}

/// What a restore changes in the hardware, for the guest's event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HardwareChange {
    pub old_memory: u64,
    pub new_memory: u64,
    pub old_vcpus: u32,
    pub new_vcpus: u32,
}

impl HardwareChange {
    pub fn changed(&self) -> bool {
        self.old_memory != self.new_memory || self.old_vcpus != self.new_vcpus
    }

    /// The event data: old and new memory (u64), old and new vCPUs (u32).
    pub fn data(&self) -> Vec<u8> {
        let mut d = Vec::with_capacity(24);
        d.extend_from_slice(&self.old_memory.to_le_bytes());
        d.extend_from_slice(&self.new_memory.to_le_bytes());
        d.extend_from_slice(&self.old_vcpus.to_le_bytes());
        d.extend_from_slice(&self.new_vcpus.to_le_bytes());
        d
    }
}

/// Can a state saved as `saved` run as `memory` bytes and `vcpus` vCPUs
/// on this host (`host`: its KVM's CPUID table)? The reason if not.
pub fn check_restore(
    saved: &Machine,
    memory: u64,
    vcpus: u32,
    host: &[CpuidEntry],
) -> Result<HardwareChange, String> {
    crate::vm::check_hardware(memory, vcpus)?;
    if memory < saved.used_bytes {
        return Err(format!(
            "memory shrunk below what the guest used: the saved memory holds data up to byte {:#x} \
             ({} MiB), the configured size is {} MiB",
            saved.used_bytes,
            saved.used_bytes.div_ceil(1 << 20),
            memory >> 20
        ));
    }
    if vcpus < saved.vcpus {
        return Err(format!(
            "the saved state has {} vCPUs and the configuration {vcpus}: removing a vCPU the guest \
             runs on is not supported",
            saved.vcpus
        ));
    }
    for (leaf, sub, r) in FEATURE_REGS {
        let Some(s) = saved
            .cpuid
            .iter()
            .find(|e| e.function == leaf && e.index == sub)
        else {
            continue;
        };
        let have = host
            .iter()
            .find(|e| e.function == leaf && e.index == sub)
            .map(|e| reg(e, r))
            .unwrap_or(0);
        let missing = reg(s, r) & !have;
        if missing != 0 {
            let b = missing.trailing_zeros();
            let what = match feature_name(leaf, r, b) {
                Some(n) => format!("{n} (CPUID leaf {leaf:#x}.{sub} {r} bit {b})"),
                None => format!("CPUID leaf {leaf:#x}.{sub} {r} bit {b}"),
            };
            return Err(format!(
                "the guest's CPUID exposes {what}, which this host's KVM does not support"
            ));
        }
    }
    Ok(HardwareChange {
        old_memory: saved.memory_bytes,
        new_memory: memory,
        old_vcpus: saved.vcpus,
        new_vcpus: vcpus,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine() -> Machine {
        Machine {
            version: 1,
            memory_bytes: 32 << 20,
            vcpus: 1,
            cpuid: vec![CpuidEntry {
                function: 7,
                index: 0,
                flags: 1,
                eax: 0,
                ebx: 1 << 5,
                ecx: 0,
                edx: 0,
            }],
            msrs: vec![],
            clock_ns: 0,
            service: ServiceState::default(),
            after_restore: vec![],
            used_bytes: 20 << 20,
            saved_at: 0,
            migrated_at_ns: None,
        }
    }

    #[test]
    fn page_maps_round_trip_through_their_record_and_coalesce() {
        let mut m = PageMap::zero(16);
        for p in 2..6 {
            m.pages[p] = Some((0, (p as u64 - 2) * PAGE));
        }
        m.pages[7] = Some((1, 0));
        m.pages[8] = Some((1, PAGE));
        m.pages[9] = Some((0, 4 * PAGE));
        let r = m.to_record();
        assert_eq!(r.extents.len(), 3, "{r:?}");
        assert_eq!(PageMap::from_record(&r, 16).unwrap(), m);
        assert_eq!(m.used_bytes(), 10 * PAGE);
        assert_eq!(m.images(), [0, 1].into());
        let bad = MemoryMap {
            extents: vec![MemoryExtent {
                guest_addr: 15 * PAGE,
                length: 2 * PAGE,
                image: 0,
                image_offset: 0,
            }],
        };
        assert!(PageMap::from_record(&bad, 16).is_err());
    }

    #[test]
    fn restore_checks_name_what_does_not_fit() {
        let host = machine().cpuid;
        let ok = check_restore(&machine(), 64 << 20, 2, &host).unwrap();
        assert!(ok.changed());
        assert_eq!(ok.data().len(), 24);
        let e = check_restore(&machine(), 16 << 20, 1, &host).unwrap_err();
        assert!(e.contains("memory shrunk below what the guest used"), "{e}");
        let e = check_restore(
            &Machine {
                vcpus: 2,
                ..machine()
            },
            32 << 20,
            1,
            &host,
        )
        .unwrap_err();
        assert!(e.contains("2 vCPUs"), "{e}");
        let mut m = machine();
        m.cpuid[0].ebx |= 1 << 16;
        let e = check_restore(&m, 32 << 20, 1, &host).unwrap_err();
        assert!(e.contains("avx512f") && e.contains("bit 16"), "{e}");
    }
}
