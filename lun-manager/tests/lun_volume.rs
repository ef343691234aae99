//! A LUN's volume configuration on real LUN files: the label region (and
//! in the offset layout the GPT) is not layered, refused for writes and
//! read from the LUN file itself.

use std::os::unix::fs::FileExt;

use lun_manager::{CreateSpec, Layout, Lun};
use lungate_block::volume::{Error, Volume, VolumeOptions};

#[test]
fn protected_label_range_is_refused_and_read_from_the_lun_file() {
    let d = tempfile::tempdir().unwrap();
    for layout in [Layout::Offset, Layout::Truncate] {
        let p = d.path().join(format!("{layout}.lun"));
        let lun = Lun::create(
            &p,
            &CreateSpec {
                name: format!("{layout}"),
                disks: vec![4 << 20],
                memory: 1 << 20,
                vcpus: 1,
                layout,
                cluster_size: 0,
                checksums: false,
            },
        )
        .unwrap();
        let cfg = lun.volume_config(VolumeOptions::default());
        let l = lun.label().label_region();
        let label = l.offset..l.end();
        assert!(cfg.protected.contains(&label));
        if layout == Layout::Offset {
            // The primary and backup GPT are derived from the label and
            // rewritten in place: not layered either.
            assert!(cfg.protected.contains(&(0..1 << 20)));
            let end = lun.label().lun_size;
            assert!(cfg.protected.contains(&(end - (1 << 20)..end)));
        }
        let vol = Volume::open(cfg.clone()).unwrap();
        let disk = lun.disks()[0];
        vol.write(disk.offset, &[7u8; 5000]).unwrap();
        vol.snapshot("a", "").unwrap();
        vol.write(disk.offset, &[9u8; 5000]).unwrap();
        let e = vol.write(label.start + 100, &[1u8; 10]).unwrap_err();
        assert!(matches!(e, Error::Protected { .. }), "{e}");
        let e = vol.trim(label.start - 4096, 8192).unwrap_err();
        assert!(matches!(e, Error::Protected { .. }), "{e}");
        // Reads of the label region come from the LUN file as it is now.
        let mut through = vec![0u8; 4096];
        vol.read(label.start, &mut through).unwrap();
        let mut direct = vec![0u8; 4096];
        lun.file()
            .expect("a file LUN")
            .read_exact_at(&mut direct, label.start)
            .unwrap();
        assert_eq!(through, direct);
        assert_eq!(&through[..8], b"LUNGATE\0");
        // The base still holds the snapshot's data, the live view the new.
        let mut b = [0u8; 5000];
        vol.read_snapshot("a", disk.offset, &mut b).unwrap();
        assert_eq!(b, [7u8; 5000]);
        vol.read(disk.offset, &mut b).unwrap();
        assert_eq!(b, [9u8; 5000]);
        drop(vol);
        // The LUN still opens (label and GPT untouched).
        drop(lun);
        Lun::open(&p, lun_manager::Access::ReadOnly).unwrap();
        let vol = Volume::open(cfg).unwrap();
        vol.read(disk.offset, &mut b).unwrap();
        assert_eq!(b, [9u8; 5000]);
    }
}
