//! Growing a layered volume (`Volume::grow`): older layers keep their
//! geometry and their bytes, the live chain reads the grown range from the
//! (grown) base and takes writes there, snapshots, reverts, merges, clones
//! at a snapshot's own size and a manifest rebuilt from the layer headers
//! all work across the size change.

mod common;

use lungate_block::volume::{repair, Volume, VolumeConfig};

const MIB: u64 = 1 << 20;
const CS: u64 = 64 << 10;

fn pat(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(7) ^ seed | 1)
        .collect()
}

fn read(v: &Volume, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    v.read(off, &mut b).unwrap();
    b
}

fn read_snap(v: &Volume, snap: &str, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    v.read_snapshot(snap, off, &mut b).unwrap();
    b
}

/// The file grows first, as the LUN's resize does; then the volume.
fn grow(v: Volume, cfg: &VolumeConfig, size: u64) -> (Volume, VolumeConfig) {
    cfg.file.set_len(size).unwrap();
    v.grow(size).unwrap();
    drop(v);
    let cfg = VolumeConfig {
        size,
        ..cfg.clone()
    };
    (Volume::open(cfg.clone()).unwrap(), cfg)
}

#[test]
fn a_grown_volume_keeps_every_snapshot_and_serves_the_new_range() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::lun_config(dir.path(), "g", 4 * MIB, CS, None);
    let v = Volume::open(cfg.clone()).unwrap();
    let (a, b, c) = (pat(65536, 1), pat(65536, 2), pat(65536, 3));
    v.write(0, &a).unwrap();
    v.write(4 * MIB - 65536, &a).unwrap();
    v.snapshot("s1", "").unwrap();
    v.write(0, &b).unwrap();
    v.snapshot("s2", "").unwrap();
    v.write(0, &c).unwrap();
    v.flush().unwrap();

    // Growing a plain or a shrinking size is refused; so is not growing.
    assert!(v.grow(4 * MIB).is_err());
    let (v, cfg) = grow(v, &cfg, 12 * MIB);
    assert_eq!(v.size(), 12 * MIB);
    assert_eq!(read(&v, 0, 65536), c);
    assert_eq!(read(&v, 4 * MIB - 65536, 65536), a);
    assert_eq!(read_snap(&v, "s1", 0, 65536), a);
    assert_eq!(read_snap(&v, "s2", 0, 65536), b);
    assert!(read(&v, 4 * MIB, 8 * MIB as usize).iter().all(|&x| x == 0));
    let d = pat(65536, 4);
    v.write(10 * MIB, &d).unwrap();
    v.flush().unwrap();
    drop(v);

    // Reopened: the layers of both sizes load; the data is where it was.
    let v = Volume::open(cfg.clone()).unwrap();
    assert_eq!(read(&v, 10 * MIB, 65536), d);
    assert_eq!(read_snap(&v, "s1", 4 * MIB - 65536, 65536), a);
    // A snapshot of the grown volume and a revert to it.
    v.snapshot("s3", "").unwrap();
    v.write(10 * MIB, &pat(65536, 9)).unwrap();
    v.revert("s3").unwrap();
    assert_eq!(read(&v, 10 * MIB, 65536), d);
    assert_eq!(read(&v, 0, 65536), c);

    // A clone of s1 at s1's size; one larger than the volume is refused.
    let too_big = common::lun_config(dir.path(), "big", 16 * MIB, CS, None);
    assert!(v.clone_to("s1", too_big).is_err());
    let ccfg = common::lun_config(dir.path(), "c1", 4 * MIB, CS, None);
    let clone = v.clone_to("s1", ccfg.clone()).unwrap();
    assert_eq!(read(&clone, 0, 65536), a);
    drop(clone);
    let clone = Volume::open(ccfg).unwrap();
    assert_eq!(read(&clone, 4 * MIB - 65536, 65536), a);
    drop(clone);
    // s3's chain holds a layer of the grown size: a clone of it at the old
    // size is refused.
    let small = common::lun_config(dir.path(), "c3", 4 * MIB, CS, None);
    assert!(v.clone_to("s3", small).is_err());

    // Deleting the old snapshots merges their layers into the grown ones.
    v.delete_snapshot("s2").unwrap();
    v.delete_snapshot("s3").unwrap();
    assert_eq!(read(&v, 0, 65536), c);
    assert_eq!(read(&v, 10 * MIB, 65536), d);
    assert_eq!(read_snap(&v, "s1", 0, 65536), a);
    v.flush().unwrap();
    drop(v);

    // A manifest lost after the grow is rebuilt at the largest layer size.
    let layers = lungate_block::store::file::layers_dir(&cfg.lun_path);
    std::fs::remove_file(layers.join("manifest.0")).unwrap();
    std::fs::remove_file(layers.join("manifest.1")).unwrap();
    let r = repair::rebuild_manifest(&cfg, &|_| None).unwrap();
    // s1 is the base (the first snapshot of a plain volume, named
    // `recovered-base` by a rebuild); the rest was merged into the live
    // layer by the deletes.
    assert!(
        r.layers >= 1 && !r.snapshots.is_empty(),
        "{:?}",
        r.snapshots
    );
    let v = Volume::open(cfg).unwrap();
    assert_eq!(v.size(), 12 * MIB);
    assert_eq!(read(&v, 0, 65536), c);
    assert_eq!(read(&v, 10 * MIB, 65536), d);
}

/// A crash right after the grow's commit, before the owner's label knows:
/// the volume opens at the manifest's (larger) size, and a manifest
/// smaller than the owner says is damage.
#[test]
fn a_volume_opens_at_its_manifest_size_when_the_owner_has_not_caught_up() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::lun_config(dir.path(), "h", 4 * MIB, CS, None);
    let v = Volume::open(cfg.clone()).unwrap();
    v.write(0, &pat(4096, 5)).unwrap();
    v.snapshot("s1", "").unwrap();
    cfg.file.set_len(8 * MIB).unwrap();
    v.grow(8 * MIB).unwrap();
    drop(v);
    let v = Volume::open(cfg.clone()).unwrap();
    assert_eq!(v.size(), 8 * MIB);
    assert_eq!(read(&v, 0, 4096), pat(4096, 5));
    drop(v);
    let bigger = VolumeConfig {
        size: 16 * MIB,
        ..cfg.clone()
    };
    cfg.file.set_len(16 * MIB).unwrap();
    let e = Volume::open(bigger).unwrap_err().to_string();
    assert!(e.contains("manifest is for LUN"), "{e}");
}
