//! Damaged metadata never turns into data loss: a layers directory whose
//! manifest is gone is refused with every layer file kept (and `repair`
//! rebuilds it from the layer headers), a truncated delta is refused
//! instead of read as older or as zeros, a damaged header slot is only
//! passed over when it is what a torn write leaves, and an unlisted layer
//! that may hold data is kept.

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use lungate_block::store::file::layers_dir;
use lungate_block::volume::{repair, Volume, VolumeConfig, VolumeOptions};
use uuid::Uuid;

const CS: u64 = 4096;
const SIZE: u64 = 256 * CS;

fn lun(dir: &Path, name: &str) -> VolumeConfig {
    common::lun_config(dir, name, SIZE, CS, None)
}

fn all(v: &Volume) -> Vec<u8> {
    let mut b = vec![0u8; v.size() as usize];
    v.read(0, &mut b).unwrap();
    b
}

fn snap(v: &Volume, name: &str) -> Vec<u8> {
    let mut b = vec![0u8; v.size() as usize];
    v.read_snapshot(name, 0, &mut b).unwrap();
    b
}

fn deltas(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "delta"))
        .collect();
    v.sort();
    v
}

/// Base, snapshot `a`, more writes, snapshot `b`, more writes, flushed.
/// Returns (base contents, contents at b, live contents, live layer).
fn two_snapshots(cfg: &VolumeConfig) -> (Vec<u8>, Vec<u8>, Vec<u8>, Uuid) {
    let v = Volume::open(cfg.clone()).unwrap();
    v.write(0, &[1; 10_000]).unwrap();
    let base = all(&v);
    v.snapshot("a", "first").unwrap();
    v.write(CS, &[2; 10_000]).unwrap();
    let at_b = all(&v);
    v.snapshot("b", "second").unwrap();
    v.write(3 * CS, &[3; 100]).unwrap();
    v.write(200 * CS, &[4; 3 * CS as usize]).unwrap();
    v.flush().unwrap();
    let live = all(&v);
    let top = v.chain()[0];
    (base, at_b, live, top)
}

fn open_err(cfg: &VolumeConfig) -> String {
    match Volume::open(cfg.clone()) {
        Ok(_) => panic!("the damaged volume was opened"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_manifests_refuse_the_volume_and_keep_every_layer() {
    let d = tempfile::tempdir().unwrap();
    let cfg = lun(d.path(), "vm");
    two_snapshots(&cfg);
    let dir = layers_dir(&cfg.lun_path);
    let before = deltas(&dir);
    assert_eq!(before.len(), 2);
    std::fs::remove_file(dir.join("manifest.0")).unwrap();
    std::fs::remove_file(dir.join("manifest.1")).unwrap();

    for read_only in [true, false] {
        let c = VolumeConfig {
            options: VolumeOptions {
                read_only,
                ..cfg.options
            },
            ..cfg.clone()
        };
        let e = open_err(&c);
        assert!(e.contains("no manifest"), "{e}");
        assert!(e.contains("lunctl repair"), "{e}");
        assert_eq!(deltas(&dir), before, "a layer file was removed");
    }
}

#[test]
fn repair_rebuilds_a_lost_manifest_from_the_layer_headers() {
    let d = tempfile::tempdir().unwrap();
    let cfg = lun(d.path(), "vm");
    let (base, at_b, live, top) = two_snapshots(&cfg);
    let dir = layers_dir(&cfg.lun_path);
    // One slot deleted, the other damaged beyond use.
    std::fs::remove_file(dir.join("manifest.0")).unwrap();
    let m1 = dir.join("manifest.1");
    let mut b = std::fs::read(&m1).unwrap();
    b[70] ^= 0xff;
    std::fs::write(&m1, &b).unwrap();
    assert!(open_err(&cfg).contains("no valid manifest slot"));

    let r = repair::rebuild_manifest(&cfg, &|_| None).unwrap();
    assert_eq!(r.top, top);
    assert_eq!(r.layers, 2);
    assert_eq!(
        r.snapshots,
        vec!["recovered-base".to_string(), "b".to_string()]
    );
    assert_eq!(r.kept_aside, vec![dir.join("manifest.1.damaged")]);
    assert!(dir.join("manifest.1.damaged").exists());

    let v = Volume::open(cfg.clone()).unwrap();
    assert_eq!(all(&v), live, "live data after repair");
    assert_eq!(snap(&v, "b"), at_b);
    assert_eq!(snap(&v, "recovered-base"), base);
    let b = v.snapshots().into_iter().find(|s| s.name == "b").unwrap();
    assert_eq!(b.description, "second");
    // It is a working volume again.
    v.write(5 * CS, &[9; 10]).unwrap();
    v.revert("b").unwrap();
    assert_eq!(all(&v), at_b);
    drop(v);
    let e = repair::rebuild_manifest(&cfg, &|_| None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("nothing to repair"), "{e}");
}

#[test]
fn a_truncated_live_delta_is_refused_not_read_as_the_snapshot() {
    let d = tempfile::tempdir().unwrap();
    let cfg = lun(d.path(), "vm");
    let (_, _, _, top) = two_snapshots(&cfg);
    let delta = layers_dir(&cfg.lun_path).join(format!("{top}.delta"));
    let f = OpenOptions::new().write(true).open(&delta).unwrap();
    f.set_len(4096).unwrap();
    let e = open_err(&cfg);
    assert!(e.contains("truncated"), "{e}");
    assert!(delta.exists());
}

#[test]
fn a_delta_truncated_inside_its_data_is_refused_not_read_as_zeros() {
    let d = tempfile::tempdir().unwrap();
    let cfg = lun(d.path(), "vm");
    let (_, _, _, top) = two_snapshots(&cfg);
    let delta = layers_dir(&cfg.lun_path).join(format!("{top}.delta"));
    let f = OpenOptions::new().write(true).open(&delta).unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len - CS).unwrap();
    let e = open_err(&cfg);
    assert!(e.contains("committed clusters are missing"), "{e}");
}

fn slot_generation(f: &std::fs::File, slot: u64) -> u64 {
    let mut g = [0u8; 8];
    f.read_exact_at(&mut g, slot * 4096 + 16).unwrap();
    u64::from_le_bytes(g)
}

#[test]
fn a_damaged_header_slot_is_passed_over_only_when_it_is_a_torn_write() {
    let d = tempfile::tempdir().unwrap();
    let cfg = lun(d.path(), "vm");
    let (_, _, live, top) = two_snapshots(&cfg);
    let delta = layers_dir(&cfg.lun_path).join(format!("{top}.delta"));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&delta)
        .unwrap();
    let newer = if slot_generation(&f, 0) > slot_generation(&f, 1) {
        0
    } else {
        1
    };
    let mut saved = vec![0u8; 4096];
    f.read_exact_at(&mut saved, newer * 4096).unwrap();

    // The newest header zeroed: committed metadata is gone, refused.
    f.write_all_at(&[0u8; 4096], newer * 4096).unwrap();
    let e = open_err(&cfg);
    assert!(e.contains("committed header is missing"), "{e}");

    // Garbage in the newest slot: refused.
    f.write_all_at(&[0x5a; 4096], newer * 4096).unwrap();
    let e = open_err(&cfg);
    assert!(e.contains("not a torn write"), "{e}");

    // What a torn write of the next header leaves in the older slot: its
    // first sector says the next generation, the rest is damaged. The
    // older slot's header is skipped with a warning; the newest is used.
    f.write_all_at(&saved, newer * 4096).unwrap();
    let older = 1 - newer;
    let g = slot_generation(&f, newer);
    f.write_all_at(&(g + 1).to_le_bytes(), older * 4096 + 16)
        .unwrap();
    f.write_all_at(&[0xab; 512], older * 4096 + 1024).unwrap();
    let v = Volume::open(cfg.clone()).unwrap();
    assert_eq!(all(&v), live);
    assert!(
        v.warnings().iter().any(|w| w.contains("torn header write")),
        "{:?}",
        v.warnings()
    );
}

#[test]
fn an_unlisted_layer_that_may_hold_data_is_kept_and_reported() {
    let d = tempfile::tempdir().unwrap();
    let cfg = lun(d.path(), "vm");
    let (_, _, live, top) = two_snapshots(&cfg);
    let dir = layers_dir(&cfg.lun_path);
    let stray = dir.join(format!("{}.delta", Uuid::new_v4()));
    std::fs::copy(dir.join(format!("{top}.delta")), &stray).unwrap();
    let v = Volume::open(cfg.clone()).unwrap();
    assert_eq!(all(&v), live);
    assert!(stray.exists(), "a layer that may hold data was removed");
    assert!(
        v.warnings().iter().any(|w| w.contains("kept a layer file")),
        "{:?}",
        v.warnings()
    );
}

#[test]
fn a_layer_retired_by_a_commit_is_removed_when_a_crash_left_it() {
    let d = tempfile::tempdir().unwrap();
    let cfg = lun(d.path(), "vm");
    let (_, at_b, _, top) = two_snapshots(&cfg);
    let dir = layers_dir(&cfg.lun_path);
    let old = dir.join(format!("{top}.delta"));
    let copy = d.path().join("old-top");
    std::fs::copy(&old, &copy).unwrap();
    let v = Volume::open(cfg.clone()).unwrap();
    v.revert("b").unwrap();
    drop(v);
    assert!(!old.exists());
    // As if the crash came between the revert's commit and the removal.
    std::fs::copy(&copy, &old).unwrap();
    let v = Volume::open(cfg.clone()).unwrap();
    assert!(!old.exists(), "the retired layer was kept");
    assert_eq!(all(&v), at_b);
}

#[test]
fn a_first_snapshot_interrupted_before_its_rename_leaves_a_plain_volume() {
    let d = tempfile::tempdir().unwrap();
    let cfg = lun(d.path(), "vm");
    let v = Volume::open(cfg.clone()).unwrap();
    v.write(0, &[7; 5000]).unwrap();
    v.snapshot("a", "").unwrap();
    let want = all(&v);
    drop(v);
    // Move the committed directory back to its staging name: the state a
    // crash before the publishing rename leaves.
    let dir = layers_dir(&cfg.lun_path);
    let staging = lungate_block::store::file::staging_dir(&dir);
    std::fs::rename(&dir, &staging).unwrap();
    let foreign = d.path().join("keep-me");
    std::fs::write(&foreign, b"x").unwrap();
    let v = Volume::open(cfg.clone()).unwrap();
    assert!(!staging.exists(), "staging directory left behind");
    assert!(!v.is_layered());
    assert_eq!(all(&v), want);
    assert!(foreign.exists());
    // And a staging directory holding something else is left alone.
    drop(v);
    std::fs::create_dir(&staging).unwrap();
    std::fs::write(staging.join("notes.txt"), b"mine").unwrap();
    let v = Volume::open(cfg.clone()).unwrap();
    assert!(staging.join("notes.txt").exists());
    assert!(v.warnings().iter().any(|w| w.contains("left alone")));
}
