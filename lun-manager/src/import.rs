//! Converting a raw disk image into a new LUN (`lunctl import`): the image
//! becomes disk0 of a LUN made by [`Lun::create`], byte for byte, written
//! through the disk's view ([`Lun::disk_view`]). So in the `aligned`
//! layout every block of the image but the shadowed first MiB lands at its
//! own offset in the LUN file (the first MiB in the state region's shadow
//! area); in the other layouts it lands at disk0's offset.
//!
//! The copy is sparse: only the image's data extents are read, and blocks
//! of zeros are not written to a fresh (sparse) LUN file. On a block device
//! disk0 is zeroed first, so nothing the device held shows through holes.
//! This module only reads the image; it never changes it.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{Error, IoContext, Result};
use crate::format::{align_up, Layout, RegionKind, MIB, SHADOW_LEN};
use crate::lun::{CreateSpec, Lun};
use crate::progress::Progress;
use lungate_block::sys as fileops;

/// Formats that are not raw images, by their magic at byte 0: importing
/// their container bytes as a disk would give the guest garbage.
const FOREIGN: [(&[u8], &str); 4] = [
    (b"QFI\xfb", "qcow2"),
    (b"KDMV", "VMDK"),
    (b"vhdxfile", "VHDX"),
    (b"conectix", "VHD"),
];

/// The size disk0 gets for an image of `len` bytes: the image rounded up to
/// 1 MiB, and in the aligned layout more than the shadowed range.
pub fn disk_size_for(layout: Layout, len: u64) -> Option<u64> {
    let d = align_up(len.max(1))?;
    Some(match layout {
        Layout::Aligned => d.max(SHADOW_LEN + MIB),
        Layout::Offset | Layout::Truncate => d,
    })
}

/// What an import did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Imported {
    /// Bytes of the image.
    pub image_len: u64,
    /// Bytes of data copied (holes and zero blocks skipped).
    pub copied: u64,
}

/// Make a LUN at `path` from `spec` whose disk0 holds the raw image at
/// `image`. `spec.disks[0]` must hold the image ([`disk_size_for`]). On
/// any error the new LUN is removed again (a block device's label wiped).
/// Reports the `import` phase (bytes of the image's data extents) to
/// `progress`.
pub fn import_raw(
    image: &Path,
    path: &Path,
    spec: &CreateSpec,
    progress: &mut dyn Progress,
) -> Result<(Lun, Imported)> {
    let src = File::open(image).ctx(image, "open image")?;
    let image_len = fileops::backing_size(&src).ctx(image, "size")?;
    let mut head = [0u8; 8];
    let got = src.read_at(&mut head, 0).ctx(image, "read image")?;
    if let Some((_, fmt)) = FOREIGN.iter().find(|(m, _)| head[..got].starts_with(m)) {
        return Err(Error::Invalid(format!(
            "{} is a {fmt} image, not a raw one; convert it first: qemu-img convert -O raw {} IMAGE.raw",
            image.display(),
            image.display()
        )));
    }
    if Lun::probe_label(image).is_ok() {
        return Err(Error::Invalid(format!(
            "{} is a lungate LUN; copy a VM with lunctl snapshot and lunctl clone instead",
            image.display()
        )));
    }
    let disk0 = spec.disks.first().copied().unwrap_or(0);
    if disk0 < image_len {
        return Err(Error::Invalid(format!(
            "disk0 of {disk0} bytes cannot hold the {image_len}-byte image {}",
            image.display()
        )));
    }
    let lun = Lun::create(path, spec)?;
    match copy(&src, image, image_len, &lun, progress) {
        Ok(copied) => Ok((lun, Imported { image_len, copied })),
        Err(e) => {
            // Ours: made just above; nothing else can hold it yet.
            let _ = lun.delete();
            Err(e)
        }
    }
}

fn copy(
    src: &File,
    image: &Path,
    image_len: u64,
    lun: &Lun,
    progress: &mut dyn Progress,
) -> Result<u64> {
    if lun.is_block_device() {
        let len = lun.disks()[0].length;
        lun.zero_region(RegionKind::Disk, 0, 0, len)?;
    }
    let extents = fileops::data_extents(src, 0, image_len).ctx(image, "map image")?;
    let total: u64 = extents.iter().map(|(_, l)| l).sum();
    let mut read = 0;
    progress.update("import", 0, total);
    let mut buf = vec![0u8; MIB as usize];
    let mut copied = 0;
    for (offset, len) in extents {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(buf.len() as u64) as usize;
            let at = offset + done;
            src.read_exact_at(&mut buf[..n], at)
                .ctx(image, "read image")?;
            // Zero blocks stay holes of the fresh LUN (or were zeroed above).
            for (i, block) in buf[..n].chunks(4096).enumerate() {
                if block.iter().any(|&b| b != 0) {
                    let o = at + (i * 4096) as u64;
                    lun.write_region(RegionKind::Disk, 0, o, block)?;
                    copied += block.len() as u64;
                }
            }
            done += n as u64;
            read += n as u64;
            progress.update("import", read, total);
        }
    }
    lun.sync()?;
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lun::Access;

    fn spec(layout: Layout, disk0: u64) -> CreateSpec {
        CreateSpec {
            name: "imp".into(),
            disks: vec![disk0],
            memory: MIB,
            vcpus: 1,
            layout,
            cluster_size: 0,
            checksums: false,
        }
    }

    /// A sparse image: an MBR-like first sector, a block at 1 MiB + 4 KiB,
    /// a hole, and an unaligned tail.
    fn image(dir: &Path) -> (std::path::PathBuf, Vec<u8>) {
        let len = 5 * MIB + 1000;
        let mut want = vec![0u8; len as usize];
        want[510] = 0x55;
        want[511] = 0xaa;
        for (i, b) in want[(MIB + 4096) as usize..(MIB + 8192) as usize]
            .iter_mut()
            .enumerate()
        {
            *b = i as u8 | 1;
        }
        want[len as usize - 1] = 7;
        let p = dir.join("disk.raw");
        let f = File::create(&p).unwrap();
        f.set_len(len).unwrap();
        f.write_all_at(&want[..512], 0).unwrap();
        f.write_all_at(
            &want[(MIB + 4096) as usize..(MIB + 8192) as usize],
            MIB + 4096,
        )
        .unwrap();
        f.write_all_at(&want[len as usize - 1..], len - 1).unwrap();
        (p, want)
    }

    #[test]
    fn an_aligned_import_keeps_every_block_but_the_first_mib_at_its_own_offset() {
        let d = tempfile::tempdir().unwrap();
        let (img, want) = image(d.path());
        for layout in Layout::ALL {
            let p = d.path().join(format!("{layout}.lun"));
            let size = disk_size_for(layout, want.len() as u64).unwrap();
            assert_eq!(size, 6 * MIB);
            let mut seen = Vec::new();
            let (lun, done) = import_raw(&img, &p, &spec(layout, size), &mut |ph, d, t| {
                seen.push((ph, d, t))
            })
            .unwrap();
            assert_eq!(seen.first(), Some(&("import", 0, seen[0].2)));
            let last = *seen.last().unwrap();
            assert_eq!(last.1, last.2, "{layout}: the phase ends at its total");
            assert_eq!(done.image_len, want.len() as u64);
            assert_eq!(done.copied, 2 * 4096 + 1000, "{layout}: only data blocks");
            drop(lun);
            let l = Lun::open(&p, Access::ReadOnly).unwrap();
            let mut got = vec![0u8; size as usize];
            l.read_region(RegionKind::Disk, 0, 0, &mut got).unwrap();
            assert_eq!(&got[..want.len()], &want[..], "{layout}");
            assert!(got[want.len()..].iter().all(|&b| b == 0));
            let file = File::open(&p).unwrap();
            let mut at = vec![0u8; 4096];
            let disk0 = l.disks()[0].offset;
            file.read_exact_at(&mut at, disk0 + MIB + 4096).unwrap();
            assert_eq!(&at[..], &want[(MIB + 4096) as usize..(MIB + 8192) as usize]);
            if layout == Layout::Aligned {
                // The LUN's own MBR stays at byte 510; the image's is in
                // the shadow area.
                let mut mbr = [0u8; 520];
                file.read_exact_at(&mut mbr, 0).unwrap();
                assert_eq!(&mbr[512..520], b"EFI PART");
            }
        }
        // The image is untouched.
        assert_eq!(std::fs::read(&img).unwrap(), want);
    }

    #[test]
    fn foreign_images_and_too_small_disks_are_refused_and_leave_nothing() {
        let d = tempfile::tempdir().unwrap();
        let q = d.path().join("disk.qcow2");
        std::fs::write(&q, b"QFI\xfb\0\0\0\x03rest").unwrap();
        let p = d.path().join("x.lun");
        let silent = &mut crate::progress::silent();
        let e = import_raw(&q, &p, &spec(Layout::Aligned, 2 * MIB), silent)
            .unwrap_err()
            .to_string();
        assert!(e.contains("qcow2") && e.contains("qemu-img convert"), "{e}");
        let (img, _) = image(d.path());
        let e = import_raw(&img, &p, &spec(Layout::Aligned, 2 * MIB), silent)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot hold"), "{e}");
        assert!(!p.exists());
        // A LUN is not an image.
        let lun = d.path().join("a.lun");
        drop(Lun::create(&lun, &spec(Layout::Offset, 2 * MIB)).unwrap());
        let e = import_raw(&lun, &p, &spec(Layout::Offset, 64 * MIB), silent)
            .unwrap_err()
            .to_string();
        assert!(e.contains("is a lungate LUN"), "{e}");
        assert!(!p.exists());
    }
}
